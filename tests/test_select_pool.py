"""``summary_pool="select"``: the rule that picks a block's items, its gradient, and its refusals.

Streaming, causality and reach under the selecting pool are tested with the attention pool's
cases (``test_streaming``, ``test_causality_reach``, ``test_write_policy``, ``test_pretrained``).
"""
import pytest
import torch

import hnae
from hnae.config import SUMMARY_POOLS
from hnae.places import place_table
from hnae.pooling import POOLS, SelectPool

HEADS, ITEMS, SLOTS, WIDTH = 2, 6, 3, 4


def make_pool(seed=0) -> SelectPool:
    torch.manual_seed(seed)
    return SelectPool(HEADS * WIDTH, HEADS, ITEMS, SLOTS, torch.ones(WIDTH)).double()


def block_with_outliers(places, batch=1) -> torch.Tensor:
    """values (B, H, 1, n, E): one repeated item everywhere, and different items at ``places``."""
    generator = torch.Generator().manual_seed(5)
    common = torch.randn(HEADS, 1, 1, WIDTH, generator=generator, dtype=torch.float64)
    values = common.expand(batch, HEADS, 1, ITEMS, WIDTH).clone()
    for place in places:
        values[:, :, 0, place] = 3.0 * torch.randn(HEADS, WIDTH, generator=generator, dtype=torch.float64)
    return values


def expected_summaries(pool: SelectPool, values: torch.Tensor, kept: list[int], ranked=True) -> torch.Tensor:
    """The documented rule, written out for one block: (1, 1, K, D). ``ranked``: check that ``kept``
    are the K highest saliences (without ties)."""
    flat = values[0, :, 0]  # (H, n, E)
    mean = flat.mean(dim=1, keepdim=True)
    deviation = (flat - mean).pow(2).sum(dim=(0, 2)) / flat.pow(2).sum(dim=(0, 2)).mean()  # (n,)
    learned = torch.einsum("hne,he->n", flat, pool.salience) + pool.salience_bias
    salience = learned + pool.deviation_weight * deviation  # (n,)
    if ranked:
        assert salience.topk(SLOTS).indices.sort().values.tolist() == kept
    placed = flat + place_table(pool, "place_values")  # (H, n, E)
    rows = placed[:, kept].permute(1, 0, 2).reshape(SLOTS, HEADS * WIDTH)  # (K, D)
    return (pool.norm(pool.output(rows)) * torch.sigmoid(salience[kept]).unsqueeze(-1)).view(1, 1, SLOTS, -1)


@pytest.mark.parametrize("outliers", [[0, 2, 5], [1, 3, 4], [5, 4, 0]])
def test_the_items_that_stand_out_are_kept_in_block_order(outliers):
    pool = make_pool()
    values = block_with_outliers(outliers)
    summaries = pool(torch.zeros_like(values), values)  # keys are not read
    expected = expected_summaries(pool, values, sorted(outliers))
    assert torch.allclose(summaries, expected, atol=1e-12)


def test_the_learned_score_can_overrule_the_deviation():
    pool = make_pool()
    values = block_with_outliers([])  # (1, H, 1, n, E): every item the same vector c
    common = values[0, :, 0, 0].clone()  # (H, E)
    for place in range(ITEMS):  # items c * (1 + place / 100): no ties
        values[:, :, 0, place] *= 1 + place / 100
    for place in (0, 2, 5):  # outliers pointing against c
        values[:, :, 0, place] = -2.0 * common
    with torch.no_grad():  # a learned score along c, no deviation term: the outliers score lowest
        pool.deviation_weight.zero_()
        pool.salience.copy_(common)
    kept = pool.salience_scores(values)[0, 0].topk(SLOTS).indices.sort().values.tolist()
    assert kept == [1, 3, 4]
    assert torch.allclose(pool(values, values), expected_summaries(pool, values, kept), atol=1e-12)


def test_ties_and_rounding_keep_the_earliest_places():
    """A block of one repeated item keeps places 0..K-1, and so does the same block with rounding-size
    noise on it, giving the same summary: otherwise which places a uniform block keeps is decided by
    rounding, and two such blocks summarise differently (a novelty policy then writes both)."""
    pool = make_pool()
    uniform = block_with_outliers([])  # (1, H, 1, n, E)
    noisy = uniform + 1e-7 * torch.randn(uniform.shape, generator=torch.Generator().manual_seed(3),
                                         dtype=torch.float64)
    for values in (uniform, noisy):
        summaries = pool(values, values)
        assert torch.allclose(summaries, expected_summaries(pool, values, list(range(SLOTS)), ranked=False),
                              atol=1e-12)
    assert (pool(uniform, uniform) - pool(noisy, noisy)).abs().max() < 1e-5


def test_every_score_parameter_gets_a_gradient():
    pool = make_pool()
    values = block_with_outliers([1, 4]).requires_grad_()
    summaries = pool(values, values)
    (summaries * torch.randn_like(summaries)).sum().backward()
    for name in ("salience", "salience_bias", "deviation_weight", "place_values"):
        assert getattr(pool, name).grad.abs().sum() > 0, name
    assert values.grad.abs().sum() > 0


def test_a_model_with_selecting_pools_trains_its_scores():
    torch.manual_seed(0)
    model = hnae.HNAE(5, 16, 2, batch_first=True, windows=(4, 3, 2), summary_slots=2, summary_pool="select")
    output, _ = model(torch.randn(2, 40, 5))
    (output * torch.randn_like(output)).sum().backward()
    for (block,) in model.layers:
        for pool in block.attention.pools:
            assert isinstance(pool, SelectPool)
            assert pool.salience.grad.abs().sum() > 0 and pool.deviation_weight.grad.abs() > 0


def test_the_names_are_the_pools():
    assert SUMMARY_POOLS == tuple(POOLS)


@pytest.mark.parametrize("options, message", [
    ({"summary_pool": "mean"}, "summary_pool must be one of"),
    ({"summary_pool": "select", "summary_slots": 5, "windows": (4, 4)}, "needs summary_slots <= w_0"),
])
def test_bad_pools_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        hnae.HNAE(5, 16, **options)
    with pytest.raises(ValueError, match="needs summary_slots <= the block's items"):
        SelectPool(8, 2, 3, 4, torch.ones(4))


def test_one_level_needs_no_pool_and_takes_any_slot_count():
    model = hnae.HNAE(5, 16, windows=(4,), summary_slots=8, summary_pool="select")
    assert len(model.layers[0][0].attention.pools) == 0
