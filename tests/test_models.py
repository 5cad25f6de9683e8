"""Benchmark models: every model on every task, causality, budgets, receptive fields, missing peers."""
import json
import math
import sys

import pytest
import torch

from hnae_bench import models
from hnae_bench.models import (MODEL_NAMES, PEER_NAMES, PRESETS, ModelUnavailable, build_model,
                               count_parameters, fit_width, hnae_windows, probe_model, sinusoidal_positions,
                               tcn_receptive_field)
from hnae_bench.tasks import TASK_NAMES, make_task

TINY_TASKS = {
    'copy': dict(seq_len=12),
    'adding': dict(seq_len=16),
    'selective_copy': dict(seq_len=20, num_tokens=4, vocab_size=6),
    'associative_recall': dict(seq_len=24, num_pairs=4, num_queries=4, key_vocab_size=8, value_vocab_size=8),
    'redundant_stream': dict(seq_len=6, num_pairs=2, vocab_size=4, hold=3),
    'sparse_signal': dict(seq_len=16, num_pairs=2, vocab_size=4, noise_vocab_size=6),
}


def tiny_task(name):
    options = dict(TINY_TASKS[name])
    return make_task(name, options.pop('seq_len'), **options)


def build_or_skip(name, task, preset='small', max_len=None):
    """build_model, skipping when hnae is not importable yet or a peer is missing."""
    if name == 'hnae':
        hnae = pytest.importorskip('hnae', reason='the core hnae package does not import yet')
        if not hasattr(hnae, 'HNAE'):
            pytest.skip('hnae.HNAE is not defined yet')
    try:
        return build_model(name, task, preset, max_len)
    except ModelUnavailable as reason:
        pytest.skip(str(reason))


@pytest.mark.parametrize('task_name', TASK_NAMES)
@pytest.mark.parametrize('name', MODEL_NAMES)
def test_every_model_trains_on_every_task(name, task_name):
    torch.manual_seed(0)
    task = tiny_task(task_name)
    model = build_or_skip(name, task)
    x, y = task.sample(2, torch.Generator().manual_seed(0))
    output = model(x)
    assert output.shape == (2, task.total_length, task.output_size)
    assert torch.isfinite(output).all()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):   # a few steps on one batch: the loss must move down
        optimizer.zero_grad()
        loss = task.loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    # The gradient points downhill: a short step against it lowers the loss. (Four Adam steps
    # need not: on `adding` a fresh model can start near the mean-predicting loss and overshoot.)
    model.zero_grad()
    before = task.loss(model(x), y)
    before.backward()
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in trainable))
    with torch.no_grad():
        for p in trainable:
            p -= 1e-3 * p.grad / norm
        after = task.loss(model(x), y)
    assert after.item() < before.item()


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_models_are_causal(name):
    """Changing the input at step t leaves every output before t unchanged, and changes some after it."""
    torch.manual_seed(0)
    task = make_task('adding', 70)
    model = build_or_skip(name, task).eval()
    x = torch.randn(2, 70, 2)
    with torch.no_grad():
        reference = model(x)
        for step in (0, 15, 16, 33, 64, 69):
            changed = x.clone()
            changed[:, step] += 1.0
            output = model(changed)
            assert torch.allclose(output[:, :step], reference[:, :step], atol=1e-5), f'{name} leaks at {step}'
            assert not torch.allclose(output[:, step:], reference[:, step:], atol=1e-5)


def test_model_config_is_json_and_states_the_parameter_count():
    task = tiny_task('copy')
    for name in ('lstm', 'gru', 'tcn', 'transformer'):
        model = build_model(name, task)
        assert model.model_name == name
        config = json.loads(json.dumps(model.model_config))
        assert config['name'] == name and config['preset'] == 'small'
        assert config['parameters'] == count_parameters(model) > 0
        assert config['max_len'] == task.total_length


@pytest.mark.parametrize('preset', PRESETS)
def test_parameter_budgets_match_within_a_factor_of_1_5(preset):
    task = make_task('copy', 200)
    counts = {}
    for name in MODEL_NAMES:
        try:
            counts[name] = build_model(name, task, preset).model_config['parameters']
        except (ModelUnavailable, ImportError):
            continue   # hnae not importable yet, or a peer missing: the others must still match
    assert {'lstm', 'gru', 'tcn', 'transformer'} <= set(counts)
    assert max(counts.values()) <= 1.5 * min(counts.values()), counts
    target = models.PARAMETER_TARGETS[preset]
    assert all(0.75 * target <= c <= 1.33 * target for c in counts.values()), counts


def test_budgets_hold_at_long_lengths_where_the_tcn_grows_levels():
    task = make_task('copy', 10_000)
    tcn, lstm = build_model('tcn', task), build_model('lstm', task)
    assert tcn.model_config['levels'] > build_model('tcn', make_task('copy', 100)).model_config['levels']
    ratio = tcn.model_config['parameters'] / lstm.model_config['parameters']
    assert 1 / 1.5 <= ratio <= 1.5


def test_tcn_receptive_field_is_exact_and_covers_max_len():
    torch.manual_seed(0)
    task = make_task('adding', 60)
    model = build_model('tcn', task, max_len=40).eval()
    field = model.model_config['receptive_field']
    assert field == tcn_receptive_field(model.model_config['levels']) >= 40
    assert tcn_receptive_field(model.model_config['levels'] - 1) < 40   # no more levels than needed
    last = 59
    x = torch.randn(1, 60, 2)
    with torch.no_grad():
        reference = model(x)[0, last]
        inside, outside = x.clone(), x.clone()
        inside[0, last - field + 1] += 5.0
        outside[0, last - field] += 5.0
        assert not torch.allclose(model(inside)[0, last], reference, atol=1e-6)
        assert torch.allclose(model(outside)[0, last], reference, atol=1e-6)


def test_hnae_windows_cover_max_len():
    assert hnae_windows(100, 32) == (32, 32)
    assert hnae_windows(1024, 32) == (32, 32)
    assert hnae_windows(1025, 32) == (32, 32, 32)
    assert hnae_windows(40_000, 32) == (32, 32, 32, 32)
    assert hnae_windows(64) == (8, 8)
    assert hnae_windows(65) == (8, 8, 8)
    assert hnae_windows(1020, 8, 128) == (128, 8)
    assert hnae_windows(5020, 8, 128) == (128, 8, 8)
    model = build_or_skip('hnae', make_task('copy', 1000))
    config = model.model_config
    assert config['windows'] == [128, 8] and config['guaranteed_reach'] >= config['max_len'] == 1020
    assert config['receptive_field'] >= config['max_len']


def test_fit_width_picks_the_nearest_count():
    assert fit_width(lambda w: w * w, 1000, 1) == 32            # 1024 beats 961
    assert fit_width(lambda w: w * w, 1000, 8) == 32            # 1024 beats 576 and 1600
    assert fit_width(lambda w: 2 ** w, 1000, 1) == 10           # not quadratic: still found
    assert fit_width(lambda w: 3 * w * w + 5 * w + 7, 40_000, 1) == 115
    assert fit_width(lambda w: w * w, 10, 4, min_width=16) == 16
    assert fit_width(lambda w: w, 10 ** 9, 1, max_width=300) == 300


def test_sinusoidal_positions():
    codes = sinusoidal_positions(5, 7)
    assert codes.shape == (5, 7)
    assert torch.allclose(codes[0], torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]))
    assert torch.allclose(codes[3, :2], torch.tensor([math.sin(3.0), math.cos(3.0)]))


@pytest.mark.parametrize('name, module', [('mamba', 'mambapy.mamba'), ('xlstm', 'xlstm'),
                                          ('htransformer', 'h_transformer_1d'), ('tcn', 'pytorch_tcn')])
def test_a_missing_package_gives_model_unavailable(monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)   # makes `import module` fail
    with pytest.raises(ModelUnavailable, match=name):
        build_model(name, tiny_task('copy'))


def test_probe_turns_a_peer_failure_into_model_unavailable(monkeypatch):
    task = tiny_task('copy')
    model = build_or_skip('mamba', task)
    probe_model(model, task)   # runs on the CPU

    def broken(*args):
        raise RuntimeError('no kernel for this device')
    monkeypatch.setattr(model.body, 'forward', broken)
    with pytest.raises(ModelUnavailable, match='mamba cannot run on cpu'):
        probe_model(model, task)
    lstm = build_model('lstm', task)
    monkeypatch.setattr(lstm.body, 'forward', broken)
    with pytest.raises(RuntimeError, match='no kernel'):   # not a peer: the error is a bug, not skipped
        probe_model(lstm, task)


@pytest.mark.parametrize('name', ['xlstm', 'htransformer'])
def test_length_limited_peers_refuse_longer_inputs(name):
    task = make_task('adding', 20)
    model = build_or_skip(name, task, max_len=20)
    assert model(torch.zeros(1, 20, 2)).shape == (1, 20, 1)
    with pytest.raises(ValueError, match='max_len'):
        model(torch.zeros(1, 21, 2))


def test_bad_arguments_are_refused_with_their_names():
    task = tiny_task('copy')
    with pytest.raises(ValueError, match='unknown model name'):
        build_model('rnn', task)
    with pytest.raises(ValueError, match='preset'):
        build_model('lstm', task, preset='medium')
    with pytest.raises(TypeError, match='task'):
        build_model('lstm', 'copy')
    with pytest.raises(ValueError, match='max_len'):
        build_model('lstm', task, max_len=0)
    model = build_model('lstm', task)
    with pytest.raises(ValueError, match='x must have shape'):
        model(torch.zeros(1, 5, task.input_size + 1))
    assert set(PEER_NAMES) < set(MODEL_NAMES)


def test_xlstm_refuses_lengths_its_quadratic_form_cannot_hold():
    pytest.importorskip('xlstm')
    with pytest.raises(ModelUnavailable, match='quadratic'):
        build_model('xlstm', make_task('copy', 100_000))
