"""Tasks for memory write policies: a redundant stream and a sparse signal.

Both are key-value recall over a long stream, so the answer is found by
content; what differs is what fills the stream:

- ``redundant_stream`` (video-like): every frame repeats its scene for
  ``hold`` frames with small Gaussian noise. First ``num_pairs`` *keyed* scenes
  (key j, symbol v_j), then ``distance`` frames of unkeyed distractor scenes
  (random symbols, also held), then ``num_queries`` query frames, each for a
  different key (random order; ``0``: one per key). At query j the model outputs v_j. Storing every frame stores each scene
  ``hold`` times; a novelty policy can keep one item per scene.
- ``sparse_signal`` (distractors): ``seq_len`` frames, each a token from a
  noise vocabulary, except ``num_pairs`` frames (about ``5%`` by default) that
  are keyed data tokens (key j, symbol v_j) at random places; then the
  queries. Noise tokens differ from each other, so similarity cannot skip
  them: a policy has to learn that data tokens matter and noise does not.

Input channels (C): keys (P) + a "keyed" flag + symbols (V) + noise tokens
(N, sparse_signal only) + a query flag; a query frame has its key and the
query flag. Classes: the V symbols; loss and accuracy over the Q queries.
Dimension letters: B batch, T total steps, C channels, P pairs, Q queries.
"""

from __future__ import annotations

import math

import torch

from hnae_bench.task_base import ClassificationTask


class _KeyedRecall(ClassificationTask):
    """Shared layout: channels, queries and targets."""

    def _layout(self, noise_tokens: int) -> None:
        pairs, symbols = self.options['num_pairs'], self.options['vocab_size']
        if pairs < 1 or symbols < 2:
            raise ValueError(f'num_pairs must be >= 1 and vocab_size >= 2, got {pairs} and {symbols}')
        queries = self.options['num_queries'] or pairs
        if not 1 <= queries <= pairs:
            raise ValueError(f'num_queries must be in 1..num_pairs={pairs} (0: one per pair), '
                             f"got {self.options['num_queries']}")
        self.num_queries = queries
        self.key_offset, self.flag = 0, pairs
        self.symbol_offset = pairs + 1
        self.noise_offset = self.symbol_offset + symbols
        self.query_flag = self.noise_offset + noise_tokens
        self.input_size, self.output_size = self.query_flag + 1, symbols
        self.num_loss_steps = self.num_answer_steps = queries
        self.chance_loss = math.log(symbols)
        self.chance_accuracy = 1.0 / symbols

    def _queries(self, x: torch.Tensor, values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Write the Q query frames at the end of x (B, T, C); returns the targets (B, Q)."""
        batch, pairs = values.shape
        queries = self.num_queries
        order = torch.rand(batch, pairs, generator=generator).argsort(dim=1)[:, :queries]  # (B, Q) keys asked
        rows = torch.arange(batch).unsqueeze(1)
        steps = torch.arange(self.total_length - queries, self.total_length).expand(batch, queries)
        x[rows, steps, self.key_offset + order] = 1.0
        x[:, -queries:, self.query_flag] = 1.0
        return values.gather(1, order)


class RedundantStreamTask(_KeyedRecall):
    """Keyed scenes held ``hold`` frames, ``distance`` frames of distractor scenes, then queries.

    seq_len is the distance: frames between the last keyed scene and the first query.
    """

    name = 'redundant_stream'
    default_options = {'num_pairs': 4, 'num_queries': 0, 'vocab_size': 8, 'hold': 10, 'noise_permille': 50}

    def __init__(self, seq_len: int, **options):
        super().__init__(seq_len, **options)
        if seq_len < 0:
            raise ValueError(f'seq_len (the distance) must be >= 0, got {seq_len}')
        if self.options['hold'] < 1 or self.options['noise_permille'] < 0:
            raise ValueError(f"hold must be >= 1 and noise_permille >= 0, got {self.options['hold']} "
                             f"and {self.options['noise_permille']}")
        self._layout(noise_tokens=0)
        self.total_length = self.options['num_pairs'] * self.options['hold'] + seq_len + self.num_queries

    def sample(self, batch_size, generator):
        self._check_sample_args(batch_size, generator)
        pairs, symbols, hold = self.options['num_pairs'], self.options['vocab_size'], self.options['hold']
        values = torch.randint(0, symbols, (batch_size, pairs), generator=generator)  # (B, P): key j -> value j
        shown = torch.rand(batch_size, pairs, generator=generator).argsort(dim=1)  # (B, P): key of scene s
        filler = torch.randint(0, symbols, (batch_size, math.ceil(self.seq_len / hold)), generator=generator)
        x = torch.zeros(batch_size, self.total_length, self.input_size)
        rows = torch.arange(batch_size).unsqueeze(1)
        frames = torch.arange(pairs * hold).expand(batch_size, -1)  # (B, P*hold): the keyed scenes' frames
        keys = shown.gather(1, frames // hold)  # (B, P*hold)
        x[rows, frames, self.key_offset + keys] = 1.0
        x[rows, frames, self.symbol_offset + values.gather(1, keys)] = 1.0
        x[:, :pairs * hold, self.flag] = 1.0
        if self.seq_len:
            gap = torch.arange(self.seq_len).expand(batch_size, -1)  # (B, distance)
            x[rows, pairs * hold + gap, self.symbol_offset + filler.gather(1, gap // hold)] = 1.0
        queries = self.num_queries
        x[:, :-queries] += torch.randn(batch_size, self.total_length - queries, self.input_size,
                                     generator=generator) * (self.options['noise_permille'] / 1000)
        return x, self._queries(x, values, generator)

    def new_content_fraction(self, batch_size: int = 256, seed: int = 0) -> float:
        """The share of frames whose noise-free content differs from the frame before (the first counts).

        No policy that stores each new thing once can write fewer: each scene start, each query."""
        clean = RedundantStreamTask(self.seq_len, **{**self.options, 'noise_permille': 0})
        x, _ = clean.sample(batch_size, torch.Generator().manual_seed(seed))  # (B, T, C)
        changed = (x[:, 1:] != x[:, :-1]).any(dim=-1)  # (B, T - 1)
        return float((1 + changed.sum(dim=1)).double().mean()) / self.total_length


class SparseSignalTask(_KeyedRecall):
    """``num_pairs`` keyed data tokens at random places among ``seq_len`` noise tokens, then queries."""

    name = 'sparse_signal'
    default_options = {'num_pairs': 8, 'num_queries': 0, 'vocab_size': 8, 'noise_vocab_size': 32}

    def __init__(self, seq_len: int, **options):
        super().__init__(seq_len, **options)
        if seq_len < self.options['num_pairs']:
            raise ValueError(f"seq_len must hold num_pairs={self.options['num_pairs']} data tokens, got {seq_len}")
        if self.options['noise_vocab_size'] < 1:
            raise ValueError(f"noise_vocab_size must be >= 1, got {self.options['noise_vocab_size']}")
        self._layout(noise_tokens=self.options['noise_vocab_size'])
        self.total_length = seq_len + self.num_queries

    def sample(self, batch_size, generator):
        self._check_sample_args(batch_size, generator)
        pairs, symbols = self.options['num_pairs'], self.options['vocab_size']
        noise = torch.randint(0, self.options['noise_vocab_size'], (batch_size, self.seq_len), generator=generator)
        x = torch.zeros(batch_size, self.total_length, self.input_size)
        rows = torch.arange(batch_size).unsqueeze(1)
        x[rows, torch.arange(self.seq_len), self.noise_offset + noise] = 1.0
        places = torch.rand(batch_size, self.seq_len, generator=generator).topk(pairs, dim=1).indices  # (B, P)
        values = torch.randint(0, symbols, (batch_size, pairs), generator=generator)  # (B, P): key j -> value j
        x[rows, places] = 0.0
        x[rows, places, self.key_offset + torch.arange(pairs)] = 1.0
        x[rows, places, self.flag] = 1.0
        x[rows, places, self.symbol_offset + values] = 1.0
        return x, self._queries(x, values, generator)
