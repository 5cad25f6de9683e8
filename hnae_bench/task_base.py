"""The base classes of the synthetic tasks: `Task` and `ClassificationTask`.

The tasks themselves and their registry (`make_task`) are in `hnae_bench.tasks`
and `hnae_bench.memory_tasks`; both build on this module.

Dimension letters: B batch size, T total_length, C input_size, K output_size.
"""
import torch
import torch.nn.functional as F


class Task:
    """Base class of every task; see the subclasses for the layouts."""

    name: str = ''
    default_options: dict = {}
    seq_len: int
    input_size: int
    output_size: int
    total_length: int
    chance_loss: float
    chance_accuracy: float | None = None   # accuracy of the best input-blind predictor

    def __init__(self, seq_len: int, **options):
        if isinstance(seq_len, bool) or not isinstance(seq_len, int):
            raise TypeError(f'seq_len must be an int, got {type(seq_len).__name__}')
        unknown = sorted(set(options) - set(self.default_options))
        if unknown:
            raise ValueError(f'unknown option(s) {unknown} for task {self.name!r}; '
                             f'allowed: {sorted(self.default_options)}')
        self.seq_len = seq_len
        self.options = {**self.default_options, **options}
        for key, value in self.options.items():
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise TypeError(f'option {key} must be an int or str, got {value!r}')

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, total_length, input_size) float32 and the targets y, on the CPU."""
        raise NotImplementedError

    def loss(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """output (B, total_length, output_size) -> scalar training loss."""
        raise NotImplementedError

    def metrics(self, output: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        raise NotImplementedError

    def is_solved(self, metrics: dict[str, float]) -> bool:
        raise NotImplementedError

    def __repr__(self) -> str:
        options = ''.join(f', {k}={v!r}' for k, v in self.options.items())
        return f'{type(self).__name__}(seq_len={self.seq_len}{options})'

    def _check_sample_args(self, batch_size: int, generator: torch.Generator) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f'batch_size must be a positive int, got {batch_size!r}')
        if not isinstance(generator, torch.Generator):
            raise TypeError(f'generator must be a torch.Generator, got {type(generator).__name__}')
        if generator.device.type != 'cpu':
            raise ValueError(f'generator must live on the CPU (batches are made there), got {generator.device}')

    def _check_output(self, output: torch.Tensor) -> None:
        expected = (self.total_length, self.output_size)
        if output.dim() != 3 or tuple(output.shape[1:]) != expected:
            raise ValueError(f'output must have shape (B, {expected[0]}, {expected[1]}) for {self!r}, '
                             f'got {tuple(output.shape)}')


class ClassificationTask(Task):
    """Cross-entropy over the last `num_loss_steps` steps, accuracy over the last
    `num_answer_steps`; y holds the class targets of the loss steps, (B, num_loss_steps)."""

    solved_accuracy = 0.99
    num_loss_steps: int
    num_answer_steps: int

    def loss(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._check_output(output)
        logits = output[:, -self.num_loss_steps:]                     # (B, steps, K)
        targets = y.to(output.device)                                 # (B, steps)
        return F.cross_entropy(logits.reshape(-1, self.output_size), targets.reshape(-1))

    @torch.no_grad()
    def metrics(self, output: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """'loss' and 'accuracy' (the share of answer steps predicted right)."""
        predicted = output[:, -self.num_answer_steps:].argmax(dim=-1)  # (B, M)
        answers = y[:, -self.num_answer_steps:].to(output.device)      # (B, M)
        accuracy = (predicted == answers).float().mean().item()
        return {'loss': self.loss(output, y).item(), 'accuracy': accuracy}

    def is_solved(self, metrics: dict[str, float]) -> bool:
        return metrics['accuracy'] >= self.solved_accuracy
