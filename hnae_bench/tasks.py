"""Synthetic long-memory tasks: copy, adding, selective copy, associative recall, and the registry of all.

Every task makes batches on the fly from a `torch.Generator` (seeded, any
length, vectorised: no Python loop over time steps) and scores a model's
per-step outputs. Classification tasks feed tokens one-hot.

Dimension letters used in shape comments:
    B  batch size
    T  total_length, the time steps in one sample
    C  input_size, features per step (one-hot classes or value channels)
    K  output_size, logits per step (1 for regression)
    M  items to remember (copy symbols, selective-copy tokens, queries)
"""
import math

import torch
import torch.nn.functional as F

from hnae_bench.memory_tasks import RedundantStreamTask, SparseSignalTask
from hnae_bench.task_base import ClassificationTask, Task


class CopyTask(ClassificationTask):
    """Copy memory as in Bai, Kolter & Koltun (2018), symbols fed one-hot.

    Input tokens: M symbols from 1..8, T-1 blanks (0), a delimiter (9), then M
    more delimiters; total T + 2M steps. Targets: blank everywhere except the
    last M steps, which must repeat the symbols. Cross-entropy over all steps,
    so a model that outputs blank with certainty and then guesses uniformly
    over 1..8 scores M*ln(8)/(T+2M): the chance loss.
    """

    name = 'copy'
    default_options = {'memory_length': 10}
    blank, delimiter, num_symbols = 0, 9, 8

    def __init__(self, seq_len: int, **options):
        super().__init__(seq_len, **options)
        memory = self.options['memory_length']
        if seq_len < 1:
            raise ValueError(f'seq_len must be >= 1 for copy, got {seq_len}')
        if memory < 1:
            raise ValueError(f'memory_length must be >= 1, got {memory}')
        self.input_size = self.output_size = self.delimiter + 1
        self.total_length = seq_len + 2 * memory
        self.num_loss_steps = self.total_length
        self.num_answer_steps = memory
        self.chance_loss = memory * math.log(self.num_symbols) / self.total_length
        self.chance_accuracy = 1.0 / self.num_symbols

    def sample(self, batch_size, generator):
        self._check_sample_args(batch_size, generator)
        memory, steps = self.options['memory_length'], self.total_length
        symbols = torch.randint(1, self.num_symbols + 1, (batch_size, memory), generator=generator)  # (B, M)
        tokens = torch.full((batch_size, steps), self.blank, dtype=torch.long)   # (B, T)
        tokens[:, :memory] = symbols
        tokens[:, memory + self.seq_len - 1:] = self.delimiter                   # 1 + M delimiters
        targets = torch.full((batch_size, steps), self.blank, dtype=torch.long)  # (B, T)
        targets[:, -memory:] = symbols
        return F.one_hot(tokens, self.input_size).float(), targets               # (B, T, C), (B, T)


class AddingTask(Task):
    """The adding problem (Bai et al. 2018; Hochreiter & Schmidhuber 1997).

    Channel 0: T values uniform in [0, 1); channel 1: a marker, 1 at exactly two
    steps. The target, read at the last step, is the sum of the two marked
    values. `marker_placement='anywhere'` draws two distinct steps uniformly
    (what the TCN paper's code does); 'halves' puts one in each half (Le et
    al. 2015). Predicting the mean 1 scores the variance of the sum, 1/6.
    """

    name = 'adding'
    default_options = {'marker_placement': 'anywhere'}
    solved_mse = 1e-3

    def __init__(self, seq_len: int, **options):
        super().__init__(seq_len, **options)
        if seq_len < 2:
            raise ValueError(f'seq_len must be >= 2 for adding (two marked steps), got {seq_len}')
        if self.options['marker_placement'] not in ('anywhere', 'halves'):
            raise ValueError("marker_placement must be 'anywhere' or 'halves', "
                             f"got {self.options['marker_placement']!r}")
        self.input_size, self.output_size = 2, 1
        self.total_length = seq_len
        self.chance_loss = 2 * (1 / 12)   # Var(U1 + U2), two independent U[0, 1)

    def _marked_steps(self, batch_size, generator):
        steps = self.seq_len
        if self.options['marker_placement'] == 'halves':
            half = steps // 2
            first = torch.randint(0, half, (batch_size,), generator=generator)           # (B,)
            second = torch.randint(half, steps, (batch_size,), generator=generator)      # (B,)
        else:
            first = torch.randint(0, steps, (batch_size,), generator=generator)          # (B,)
            second = torch.randint(0, steps - 1, (batch_size,), generator=generator)     # (B,)
            second = second + (second >= first).long()   # skip `first`: uniform over the others
        return torch.stack([first, second], dim=1)                                       # (B, 2)

    def sample(self, batch_size, generator):
        self._check_sample_args(batch_size, generator)
        values = torch.rand(batch_size, self.seq_len, generator=generator)                 # (B, T)
        marked = self._marked_steps(batch_size, generator)                                 # (B, 2)
        markers = torch.zeros(batch_size, self.seq_len).scatter_(1, marked, 1.0)           # (B, T)
        targets = values.gather(1, marked).sum(dim=1)                                      # (B,)
        return torch.stack([values, markers], dim=2), targets                              # (B, T, 2), (B,)

    def loss(self, output, y):
        self._check_output(output)
        return F.mse_loss(output[:, -1, 0], y.to(output.device, output.dtype))

    @torch.no_grad()
    def metrics(self, output, y):
        mse = self.loss(output, y).item()
        return {'loss': mse, 'mse': mse}

    def is_solved(self, metrics):
        return metrics['mse'] <= self.solved_mse


class SelectiveCopyTask(ClassificationTask):
    """Selective copying as in the Mamba paper (Gu & Dao 2023), section 4.1.

    A data region of seq_len steps holds M data tokens (vocabulary V) at random
    distinct steps, in order, among noise tokens; then M steps of a dedicated
    'emit' token, during which the model outputs the data tokens in order.
    Input ids: 0 noise, 1..V data, V+1 emit. Classes: the V data tokens.
    Loss and accuracy over the M emitted tokens; chance loss ln(V).
    """

    name = 'selective_copy'
    default_options = {'num_tokens': 16, 'vocab_size': 16}
    noise = 0

    def __init__(self, seq_len: int, **options):
        super().__init__(seq_len, **options)
        memory, vocab = self.options['num_tokens'], self.options['vocab_size']
        if memory < 1 or vocab < 2:
            raise ValueError(f'num_tokens must be >= 1 and vocab_size >= 2, got {memory} and {vocab}')
        if seq_len < memory:
            raise ValueError(f'seq_len (the data region) must hold num_tokens={memory}, got {seq_len}')
        self.emit = vocab + 1
        self.input_size, self.output_size = vocab + 2, vocab
        self.total_length = seq_len + memory
        self.num_loss_steps = self.num_answer_steps = memory
        self.chance_loss = math.log(vocab)
        self.chance_accuracy = 1.0 / vocab

    def sample(self, batch_size, generator):
        self._check_sample_args(batch_size, generator)
        memory, vocab = self.options['num_tokens'], self.options['vocab_size']
        scores = torch.rand(batch_size, self.seq_len, generator=generator)          # (B, L)
        steps = scores.topk(memory, dim=1).indices.sort(dim=1).values              # (B, M) distinct, in order
        data = torch.randint(0, vocab, (batch_size, memory), generator=generator)   # (B, M)
        tokens = torch.full((batch_size, self.total_length), self.noise, dtype=torch.long)  # (B, T)
        tokens.scatter_(1, steps, data + 1)
        tokens[:, self.seq_len:] = self.emit
        return F.one_hot(tokens, self.input_size).float(), data                     # (B, T, C), (B, M)


class AssociativeRecallTask(ClassificationTask):
    """Multi-query associative recall (Arora et al. 2023, 'Zoology').

    The first 2P steps list P pairs (key, value), keys distinct within a
    sample; blanks follow; the last Q steps are queries, each one of the keys
    (distinct, random order); at a query step the model outputs its value.
    Keys and values come from separate vocabularies. Input ids: 0 blank,
    1..K keys, K+1..K+V values. Classes: the V values. seq_len is the total
    length. Loss and accuracy over the Q answers; chance loss ln(V).
    """

    name = 'associative_recall'
    default_options = {'num_pairs': 8, 'num_queries': 8, 'key_vocab_size': 16, 'value_vocab_size': 16}
    blank = 0

    def __init__(self, seq_len: int, **options):
        super().__init__(seq_len, **options)
        pairs, queries = self.options['num_pairs'], self.options['num_queries']
        keys, values = self.options['key_vocab_size'], self.options['value_vocab_size']
        if not 1 <= queries <= pairs:
            raise ValueError(f'num_queries must be in 1..num_pairs={pairs}, got {queries}')
        if keys < pairs:
            raise ValueError(f'key_vocab_size={keys} is too small for num_pairs={pairs} distinct keys')
        if values < 2:
            raise ValueError(f'value_vocab_size must be >= 2, got {values}')
        if seq_len < 2 * pairs + queries:
            raise ValueError(f'seq_len must be >= 2*num_pairs + num_queries = {2 * pairs + queries}, got {seq_len}')
        self.input_size, self.output_size = 1 + keys + values, values
        self.total_length = seq_len
        self.num_loss_steps = self.num_answer_steps = queries
        self.chance_loss = math.log(values)
        self.chance_accuracy = 1.0 / values

    def sample(self, batch_size, generator):
        self._check_sample_args(batch_size, generator)
        pairs, queries = self.options['num_pairs'], self.options['num_queries']
        key_vocab, value_vocab = self.options['key_vocab_size'], self.options['value_vocab_size']
        keys = torch.rand(batch_size, key_vocab, generator=generator).argsort(dim=1)[:, :pairs]  # (B, P)
        values = torch.randint(0, value_vocab, (batch_size, pairs), generator=generator)        # (B, P)
        asked = torch.rand(batch_size, pairs, generator=generator).argsort(dim=1)[:, :queries]  # (B, Q)
        tokens = torch.full((batch_size, self.total_length), self.blank, dtype=torch.long)      # (B, T)
        tokens[:, 0:2 * pairs:2] = keys + 1
        tokens[:, 1:2 * pairs:2] = values + 1 + key_vocab
        tokens[:, -queries:] = keys.gather(1, asked) + 1
        targets = values.gather(1, asked)                                                       # (B, Q)
        return F.one_hot(tokens, self.input_size).float(), targets                              # (B, T, C), (B, Q)


_TASKS = {task.name: task for task in (CopyTask, AddingTask, SelectiveCopyTask, AssociativeRecallTask,
                                      RedundantStreamTask, SparseSignalTask)}
TASK_NAMES: tuple[str, ...] = tuple(_TASKS)
DEFAULT_SEQ_LENS = {'copy': 1000, 'adding': 600, 'selective_copy': 4096, 'associative_recall': 1024,
                    'redundant_stream': 200, 'sparse_signal': 160}


def make_task(name: str, seq_len: int, **options) -> Task:
    """The task `name` at length seq_len; options as in its class's default_options.
    make_task(task.name, other_len, **task.options) rebuilds the same task at another length."""
    if name not in _TASKS:
        raise ValueError(f'unknown task name {name!r}; choose one of {TASK_NAMES}')
    return _TASKS[name](seq_len, **options)
