"""Task generators: layouts, chance values, scoring, determinism, argument checks."""
import math

import pytest
import torch
import torch.nn.functional as F

from hnae_bench.tasks import DEFAULT_SEQ_LENS, TASK_NAMES, Task, make_task

SHORT_LENGTHS = {'copy': 30, 'adding': 40, 'selective_copy': 50, 'associative_recall': 40,
                 'redundant_stream': 25, 'sparse_signal': 60}


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tokens_of(x: torch.Tensor) -> torch.Tensor:
    """One-hot (B, T, C) back to ids (B, T), checking it is exactly one-hot."""
    assert x.dtype == torch.float32
    assert torch.equal(x.sum(dim=-1), torch.ones(x.shape[:2]))
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    return x.argmax(dim=-1)


def logits_for(classes: torch.Tensor, num_classes: int, confidence: float = 30.0) -> torch.Tensor:
    """Logits (..., K) that put almost all probability on `classes`."""
    return F.one_hot(classes, num_classes).float() * confidence


def test_registry_names_and_defaults():
    assert TASK_NAMES == ('copy', 'adding', 'selective_copy', 'associative_recall', 'redundant_stream',
                          'sparse_signal')
    assert DEFAULT_SEQ_LENS['selective_copy'] == 4096
    for name in TASK_NAMES:
        task = make_task(name, SHORT_LENGTHS[name])
        assert isinstance(task, Task) and task.name == name
        assert task.seq_len == SHORT_LENGTHS[name]
        again = make_task(task.name, 2 * task.seq_len, **task.options)
        assert again.options == task.options and again.seq_len == 2 * task.seq_len


# --- copy ----------------------------------------------------------------------------------------

def test_copy_layout_matches_the_tcn_paper():
    seq_len = 30
    task = make_task('copy', seq_len)
    assert (task.input_size, task.output_size, task.total_length) == (10, 10, seq_len + 20)
    x, y = task.sample(64, generator(0))
    assert x.shape == (64, seq_len + 20, 10) and y.shape == (64, seq_len + 20) and y.dtype == torch.long
    tokens = tokens_of(x)
    symbols = tokens[:, :10]
    assert symbols.min() >= 1 and symbols.max() <= 8
    assert set(symbols.unique().tolist()) == set(range(1, 9))       # all eight symbols occur in 640 draws
    assert (tokens[:, 10:10 + seq_len - 1] == 0).all()               # T - 1 blanks
    assert (tokens[:, 10 + seq_len - 1:] == 9).all()                 # the delimiter and 10 more
    assert (tokens[:, 10 + seq_len - 1:] == 9).sum(dim=1).eq(11).all()
    assert (y[:, :seq_len + 10] == 0).all()
    assert torch.equal(y[:, -10:], symbols)


def test_copy_memory_length_option_changes_the_layout():
    task = make_task('copy', 5, memory_length=3)
    x, y = task.sample(4, generator(1))
    tokens = tokens_of(x)
    assert task.total_length == 11
    assert (tokens[:, 3:7] == 0).all() and (tokens[:, 7:] == 9).all()
    assert torch.equal(y[:, -3:], tokens[:, :3]) and (y[:, :8] == 0).all()


@pytest.mark.parametrize('seq_len', [1, 100, 1000])
def test_copy_chance_loss_is_what_the_best_blind_predictor_scores(seq_len):
    task = make_task('copy', seq_len)
    assert task.chance_loss == pytest.approx(10 * math.log(8) / (seq_len + 20))
    x, y = task.sample(16, generator(2))
    blind = logits_for(torch.zeros(16, task.total_length, dtype=torch.long), 10, confidence=40.0)
    blind[:, -10:] = -40.0
    blind[:, -10:, 1:9] = 0.0     # uniform over the eight symbols on the last ten steps
    metrics = task.metrics(blind, y)
    assert metrics['loss'] == pytest.approx(task.chance_loss, rel=1e-4)
    uniform_over_all = torch.zeros(16, task.total_length, 10)
    assert task.loss(uniform_over_all, y).item() > task.chance_loss


def test_copy_perfect_and_wrong_predictors():
    task = make_task('copy', 20)
    x, y = task.sample(8, generator(3))
    perfect = logits_for(y, 10)
    metrics = task.metrics(perfect, y)
    assert metrics['accuracy'] == 1.0 and metrics['loss'] < 1e-6 and task.is_solved(metrics)
    shifted = logits_for(torch.where(y > 0, y % 8 + 1, y), 10)      # every symbol wrong, blanks right
    metrics = task.metrics(shifted, y)
    assert metrics['accuracy'] == 0.0 and not task.is_solved(metrics)
    half = perfect.clone()
    half[:, -5:] = shifted[:, -5:]
    assert task.metrics(half, y)['accuracy'] == pytest.approx(0.5)
    assert not task.is_solved({'loss': 0.0, 'accuracy': 0.989}) and task.is_solved({'loss': 1.0, 'accuracy': 0.99})


# --- adding --------------------------------------------------------------------------------------

@pytest.mark.parametrize('placement', ['anywhere', 'halves'])
def test_adding_layout_and_target(placement):
    seq_len = 40
    task = make_task('adding', seq_len, marker_placement=placement)
    assert (task.input_size, task.output_size, task.total_length) == (2, 1, seq_len)
    x, y = task.sample(512, generator(4))
    assert x.shape == (512, seq_len, 2) and x.dtype == torch.float32 and y.shape == (512,)
    values, markers = x[..., 0], x[..., 1]
    assert values.min() >= 0.0 and values.max() < 1.0
    assert set(markers.unique().tolist()) == {0.0, 1.0} and markers.sum(dim=1).eq(2).all()
    assert torch.allclose(y, (values * markers).sum(dim=1))
    in_first_half = markers[:, :seq_len // 2].sum(dim=1)
    if placement == 'halves':
        assert in_first_half.eq(1).all()
    else:   # two distinct uniform steps: both in one half about half the time
        assert in_first_half.eq(1).float().mean().item() == pytest.approx(0.5, abs=0.1)
        assert in_first_half.eq(2).any() and in_first_half.eq(0).any()
        assert markers[:, -1].any() and markers[:, 0].any()


def test_adding_chance_is_the_variance_of_the_sum():
    task = make_task('adding', 50)
    assert task.chance_loss == pytest.approx(1 / 6)
    x, y = task.sample(20000, generator(5))
    mean_predictor = torch.ones(20000, 50, 1)
    assert task.metrics(mean_predictor, y)['mse'] == pytest.approx(1 / 6, abs=0.01)
    assert task.loss(0.8 * mean_predictor, y).item() > task.metrics(mean_predictor, y)['mse']


def test_adding_scores_the_last_step_only():
    task = make_task('adding', 10)
    x, y = task.sample(8, generator(6))
    output = torch.randn(8, 10, 1)
    output[:, -1, 0] = y
    metrics = task.metrics(output, y)
    assert metrics['loss'] == metrics['mse'] == 0.0 and task.is_solved(metrics)
    output[:, -1, 0] = y + 0.1
    assert task.metrics(output, y)['mse'] == pytest.approx(0.01, rel=1e-4)
    assert not task.is_solved({'loss': 0.0011, 'mse': 0.0011})


# --- selective copy ------------------------------------------------------------------------------

def test_selective_copy_layout():
    seq_len = 50
    task = make_task('selective_copy', seq_len)
    assert (task.input_size, task.output_size, task.total_length) == (18, 16, seq_len + 16)
    x, y = task.sample(32, generator(7))
    tokens = tokens_of(x)
    assert y.shape == (32, 16) and y.dtype == torch.long
    data_region, answer_region = tokens[:, :seq_len], tokens[:, seq_len:]
    assert (answer_region == 17).all() and not (data_region == 17).any()
    assert data_region.ne(0).sum(dim=1).eq(16).all()     # 16 data tokens among noise
    for row in range(32):
        in_order = data_region[row][data_region[row] != 0] - 1
        assert torch.equal(in_order, y[row])
    positions = data_region.ne(0).float().argmax(dim=1)
    assert positions.unique().numel() > 5                # data tokens start at random steps


def test_selective_copy_chance_and_scoring():
    task = make_task('selective_copy', 40, num_tokens=4, vocab_size=8)
    assert task.chance_loss == pytest.approx(math.log(8)) and task.chance_accuracy == pytest.approx(1 / 8)
    x, y = task.sample(16, generator(8))
    uniform = torch.zeros(16, task.total_length, 8)
    assert task.metrics(uniform, y)['loss'] == pytest.approx(math.log(8), rel=1e-5)
    perfect = torch.zeros(16, task.total_length, 8)
    perfect[:, -4:] = logits_for(y, 8)
    metrics = task.metrics(perfect, y)
    assert metrics['accuracy'] == 1.0 and metrics['loss'] < 1e-6 and task.is_solved(metrics)


# --- associative recall --------------------------------------------------------------------------

def test_associative_recall_layout_and_answers():
    task = make_task('associative_recall', 30, num_pairs=5, num_queries=3, key_vocab_size=7, value_vocab_size=6)
    assert (task.input_size, task.output_size, task.total_length) == (14, 6, 30)
    x, y = task.sample(64, generator(9))
    tokens = tokens_of(x)
    assert y.shape == (64, 3)
    keys, values = tokens[:, 0:10:2], tokens[:, 1:10:2]
    assert keys.min() >= 1 and keys.max() <= 7 and values.min() >= 8 and values.max() <= 13
    assert (tokens[:, 10:-3] == 0).all()
    queries = tokens[:, -3:]
    for row in range(64):
        assert keys[row].unique().numel() == 5 and queries[row].unique().numel() == 3
        value_of = dict(zip(keys[row].tolist(), (values[row] - 8).tolist()))
        assert [value_of[q] for q in queries[row].tolist()] == y[row].tolist()


def test_associative_recall_chance_and_scoring():
    task = make_task('associative_recall', 24)
    assert task.chance_loss == pytest.approx(math.log(16))
    x, y = task.sample(8, generator(10))
    uniform = torch.zeros(8, 24, 16)
    assert task.metrics(uniform, y)['loss'] == pytest.approx(math.log(16), rel=1e-5)
    perfect = torch.zeros(8, 24, 16)
    perfect[:, -8:] = logits_for(y, 16)
    assert task.metrics(perfect, y)['accuracy'] == 1.0


# --- shared behaviour ----------------------------------------------------------------------------

@pytest.mark.parametrize('name', TASK_NAMES)
def test_same_seed_same_batch_other_seed_other_batch(name):
    task = make_task(name, SHORT_LENGTHS[name])
    x1, y1 = task.sample(8, generator(11))
    x2, y2 = task.sample(8, generator(11))
    x3, y3 = task.sample(8, generator(12))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    g = generator(11)
    first, second = task.sample(8, g), task.sample(8, g)
    assert not torch.equal(first[0], second[0])      # the generator advances between batches


@pytest.mark.parametrize('name', TASK_NAMES)
def test_metrics_keys_and_output_shape_check(name):
    task = make_task(name, SHORT_LENGTHS[name])
    x, y = task.sample(2, generator(13))
    output = torch.zeros(2, task.total_length, task.output_size)
    metrics = task.metrics(output, y)
    expected = {'loss', 'mse'} if name == 'adding' else {'loss', 'accuracy'}
    assert set(metrics) == expected and all(isinstance(v, float) for v in metrics.values())
    assert task.loss(output, y).dim() == 0
    with pytest.raises(ValueError, match='output'):
        task.loss(torch.zeros(2, task.total_length - 1, task.output_size), y)
    with pytest.raises(ValueError, match='output'):
        task.metrics(torch.zeros(2, task.total_length, task.output_size + 1), y)


def test_long_sequences_are_cheap_to_make():
    x, y = make_task('copy', 100_000).sample(2, generator(14))
    assert x.shape == (2, 100_020, 10) and torch.equal(y[:, -10:], x[:, :10].argmax(-1))
    x, y = make_task('selective_copy', 4096).sample(4, generator(15))
    assert x.shape == (4, 4112, 18)


def test_bad_arguments_are_refused_with_their_names():
    with pytest.raises(ValueError, match='unknown task name'):
        make_task('parity', 10)
    with pytest.raises(ValueError, match='unknown option'):
        make_task('copy', 10, symbols=4)
    with pytest.raises(TypeError, match='seq_len'):
        make_task('copy', 10.0)
    with pytest.raises(ValueError, match='seq_len'):
        make_task('copy', 0)
    with pytest.raises(ValueError, match='seq_len'):
        make_task('adding', 1)
    with pytest.raises(ValueError, match='marker_placement'):
        make_task('adding', 10, marker_placement='ends')
    with pytest.raises(ValueError, match='seq_len'):
        make_task('selective_copy', 15)
    with pytest.raises(ValueError, match='num_queries'):
        make_task('associative_recall', 40, num_pairs=4, num_queries=5)
    with pytest.raises(ValueError, match='key_vocab_size'):
        make_task('associative_recall', 40, num_pairs=9, key_vocab_size=8)
    with pytest.raises(ValueError, match='seq_len'):
        make_task('associative_recall', 20)
    task = make_task('copy', 10)
    with pytest.raises(ValueError, match='batch_size'):
        task.sample(0, generator(0))
    with pytest.raises(TypeError, match='generator'):
        task.sample(2, 0)


def test_redundant_stream_layout_and_answers():
    task = make_task('redundant_stream', 25, num_pairs=3, vocab_size=5, hold=4, noise_permille=0)
    assert task.total_length == 3 * 4 + 25 + 3 and task.output_size == 5
    x, y = task.sample(6, generator(21))
    keys = slice(0, 3)
    symbols = slice(task.symbol_offset, task.symbol_offset + 5)
    for b in range(6):
        answer_of_key = {}
        for scene in range(3):
            frames = x[b, scene * 4:(scene + 1) * 4]
            assert torch.equal(frames, frames[:1].expand(4, -1))  # held: every frame the same (no noise)
            assert frames[0, task.flag] == 1 and frames[0, keys].sum() == 1 and frames[0, symbols].sum() == 1
            answer_of_key[int(frames[0, keys].argmax())] = int(frames[0, symbols].argmax())
        assert sorted(answer_of_key) == [0, 1, 2]
        gap = x[b, 12:12 + 25]
        assert gap[:, keys].sum() == 0 and gap[:, task.flag].sum() == 0 and torch.all(gap[:, symbols].sum(1) == 1)
        assert torch.equal(gap[0:4], gap[0:1].expand(4, -1))  # distractor scenes are held too
        queries = x[b, -3:]
        assert torch.all(queries[:, task.query_flag] == 1) and sorted(queries[:, keys].argmax(1).tolist()) == [0, 1, 2]
        assert y[b].tolist() == [answer_of_key[int(k)] for k in queries[:, keys].argmax(1)]
    noisy, _ = make_task('redundant_stream', 25, num_pairs=3, vocab_size=5, hold=4).sample(6, generator(21))
    assert 0 < (noisy - x).abs().max() < 0.5 and torch.equal(noisy[:, -3:], x[:, -3:])  # queries are clean


def test_redundant_stream_asks_some_keys():
    task = make_task('redundant_stream', 25, num_pairs=3, num_queries=2, vocab_size=5, hold=4, noise_permille=0)
    assert task.total_length == 3 * 4 + 25 + 2 and task.num_loss_steps == 2
    x, y = task.sample(6, generator(23))
    assert y.shape == (6, 2)
    for b in range(6):
        answer_of_key = {int(x[b, s * 4, :3].argmax()): int(x[b, s * 4, task.symbol_offset:].argmax())
                         for s in range(3)}
        queries = x[b, -2:]
        asked = queries[:, :3].argmax(1).tolist()
        assert torch.all(queries[:, task.query_flag] == 1) and len(set(asked)) == 2
        assert x[b, :-2, task.query_flag].sum() == 0
        assert y[b].tolist() == [answer_of_key[k] for k in asked]
    with pytest.raises(ValueError, match='num_queries'):
        make_task('redundant_stream', 5, num_pairs=3, num_queries=4)
    with pytest.raises(ValueError, match='num_queries'):
        make_task('sparse_signal', 20, num_pairs=3, num_queries=-1)


@pytest.mark.parametrize('hold, queries', [(1, 0), (4, 0), (4, 1), (10, 2)])
def test_redundant_stream_new_content(hold, queries):
    pairs = 3
    exact = make_task('redundant_stream', 0, num_pairs=pairs, num_queries=queries, hold=hold)
    asked = queries or pairs   # no distractors: every scene start and every query is new, nothing else
    assert exact.new_content_fraction() == pytest.approx((pairs + asked) / exact.total_length)
    task = make_task('redundant_stream', 8 * hold, num_pairs=pairs, num_queries=queries, hold=hold)
    # 8 distractor scenes: the first is new, each next one unless it repeats the symbol before (1 in 8)
    expected = pairs + 1 + 7 * (1 - 1 / 8) + asked
    assert task.new_content_fraction(batch_size=2000) == pytest.approx(expected / task.total_length, rel=0.03)


def test_sparse_signal_layout_and_answers():
    task = make_task('sparse_signal', 60, num_pairs=4, vocab_size=5, noise_vocab_size=7)
    assert task.total_length == 64 and task.input_size == 4 + 1 + 5 + 7 + 1
    x, y = task.sample(5, generator(22))
    noise = slice(task.noise_offset, task.noise_offset + 7)
    for b in range(5):
        body = x[b, :60]
        data = torch.nonzero(body[:, task.flag]).flatten()
        assert len(data) == 4  # exactly the keyed data tokens; the rest one noise token each
        assert torch.all(body[:, noise].sum(1) == (body[:, task.flag] == 0).float())
        value_of_key = {int(body[t, :4].argmax()): int(body[t, task.symbol_offset:task.symbol_offset + 5].argmax())
                        for t in data}
        asked = x[b, -4:, :4].argmax(1)
        assert y[b].tolist() == [value_of_key[int(k)] for k in asked]
    with pytest.raises(ValueError, match='num_pairs'):
        make_task('sparse_signal', 3, num_pairs=4)
