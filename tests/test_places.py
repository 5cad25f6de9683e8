"""Factored place tables (``place_rank``): fewer parameters, the same contracts as full tables."""

import pytest
import torch

from conftest import random_input, run_in_chunks, tiny_model
from hnae.places import add_place_table, place_rows, place_table

TOLERANCE = 1e-5


def place_parameters(model):
    return {name: p.shape for name, p in model.named_parameters() if "place" in name}


def test_rank_factors_every_place_table_and_saves_parameters():
    full, factored = tiny_model((4, 3), 2), tiny_model((4, 3), 2, place_rank=2)
    assert all(not name.endswith(("_rows", "_columns")) for name in place_parameters(full))
    shapes = place_parameters(factored)
    # per layer: the block's (w_0, D) = (4, 16) and the level-1 pool's place keys and values (H, w_0, E)
    assert shapes["layers.0.0.place_embedding_rows"] == (4, 2)
    assert shapes["layers.0.0.place_embedding_columns"] == (2, 16)
    assert shapes["layers.1.0.attention.pools.0.place_keys_rows"] == (2, 4, 2)
    assert shapes["layers.1.0.attention.pools.0.place_values_columns"] == (2, 2, 8)
    assert len(shapes) == 2 * len(place_parameters(full))
    count = lambda model: sum(p.numel() for p in model.parameters())
    # per layer: the block's table and the one pool's keys and values (2 heads each)
    saved = 2 * ((4 * 16 - (4 * 2 + 2 * 16)) + 2 * 2 * (4 * 8 - (4 * 2 + 2 * 8)))
    assert count(full) - count(factored) == saved


def test_rank_at_least_the_table_side_keeps_the_full_table():
    owner = torch.nn.Module()
    add_place_table(owner, "table", (3, 5), 3, {})
    assert list(dict(owner.named_parameters())) == ["table"] and place_table(owner, "table").shape == (3, 5)


def test_factored_table_is_the_product_and_learns_through_both_factors():
    owner = torch.nn.Module()
    add_place_table(owner, "table", (2, 6, 5), 2, {})
    table = place_table(owner, "table")  # (2, 6, 5)
    assert torch.equal(table, owner.table_rows @ owner.table_columns)
    assert 0.005 < table.std().item() < 0.05  # initialised like a full table (std 0.02)
    table.sum().backward()
    assert owner.table_rows.grad.abs().sum() > 0 and owner.table_columns.grad.abs().sum() > 0


@pytest.mark.parametrize("rank", [None, 2])
def test_place_rows_are_the_tables_rows(rank):
    owner = torch.nn.Module()
    add_place_table(owner, "table", (6, 5), rank, {})
    places = torch.tensor([[5, 0], [3, 3]])  # any index shape
    rows = place_rows(owner, "table", places)  # (2, 2, 5)
    torch.testing.assert_close(rows, place_table(owner, "table")[places], rtol=0, atol=1e-7)


@pytest.mark.parametrize("plan", [[1], [3], [5, 2, 9]])
def test_factored_model_streams_exactly(plan):
    model = tiny_model((4, 3, 2), 2, place_rank=2)
    x = random_input(2, 3 * model.receptive_field + 5, 5)
    with torch.no_grad():
        whole, _ = model(x)
        chunked, _ = run_in_chunks(model, x, plan)
    assert (whole - chunked).abs().max().item() <= TOLERANCE


def test_factored_model_step_equals_parallel():
    model = tiny_model((4, 3), 2, place_rank=3, write_policy="novelty", threshold=0.5)
    x = random_input(2, 30, 5)
    with torch.no_grad():
        whole, _ = model(x)
        state, outputs = None, []
        for t in range(30):
            output, state = model.step(x[:, t], state) if state is not None else model(x[:, :1])
            outputs.append(output.reshape(2, 1, -1))
    assert (torch.cat(outputs, dim=1) - whole).abs().max().item() <= TOLERANCE
