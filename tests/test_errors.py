"""Every bad input raises ValueError or TypeError naming the argument."""

import pytest
import torch

import hnae
from conftest import random_input, tiny_model


@pytest.mark.parametrize("options,error,name", [
    ({"windows": ()}, ValueError, "windows"),
    ({"windows": (4, 0)}, ValueError, "windows"),
    ({"windows": (4, -2)}, ValueError, "windows"),
    ({"windows": (4.0,)}, ValueError, "windows"),
    ({"proj_size": 16}, ValueError, "proj_size"),
    ({"proj_size": 20}, ValueError, "proj_size"),
    ({"num_heads": 3}, ValueError, "num_heads"),
    ({"dropout": 1.5}, ValueError, "dropout"),
    ({"summary_slots": 0}, ValueError, "summary_slots"),
    ({"place_rank": 0}, ValueError, "place_rank"),
    ({"place_rank": 2.0}, TypeError, "place_rank"),
    ({"num_layers": 0}, ValueError, "num_layers"),
])
def test_bad_constructor_arguments(options, error, name):
    arguments = {"windows": (4, 4)} | options
    with pytest.raises(error, match=name):
        hnae.HNAE(5, 16, **{k: v for k, v in arguments.items() if k != "num_layers"},
                  num_layers=options.get("num_layers", 1))


@pytest.mark.parametrize("bad_input,error,name", [
    (torch.randn(2, 3, 4, 5), ValueError, "input"),
    (torch.randn(7), ValueError, "input"),
    (torch.randn(2, 7, 6), ValueError, "input_size"),
    (torch.ones(2, 7, 5, dtype=torch.int64), TypeError, "input"),
    (torch.randn(2, 7, 5, dtype=torch.float64), TypeError, "dtype"),
    ([[0.0] * 5], TypeError, "input"),
])
def test_bad_inputs(bad_input, error, name):
    model = tiny_model((4, 4))
    with pytest.raises(error, match=name):
        model(bad_input)


@pytest.mark.parametrize("lengths,error", [
    ([3, 8], ValueError),            # longer than T
    ([3, -1], ValueError),           # negative
    ([3], ValueError),               # one per sequence
    (torch.tensor([1.5, 2.0]), TypeError),
    ("ab", TypeError),
])
def test_bad_lengths(lengths, error):
    model = tiny_model((4, 4))
    with pytest.raises(error, match="lengths"):
        model(random_input(2, 7, 5), lengths=lengths)


def test_lengths_with_packed_sequence_is_refused():
    model = tiny_model((4, 4))
    packed = torch.nn.utils.rnn.pack_padded_sequence(random_input(2, 7, 5), [7, 3], batch_first=True)
    with pytest.raises(ValueError, match="lengths"):
        model(packed, lengths=[7, 3])


def test_state_from_another_batch_size():
    model = tiny_model((4, 4))
    _, state = model(random_input(3, 7, 5))
    with pytest.raises(ValueError, match="state.*batch size 3"):
        model(random_input(2, 7, 5), state)


def test_state_from_another_configuration():
    _, state = tiny_model((4, 4))(random_input(2, 7, 5))
    with pytest.raises(ValueError, match="state.*configuration"):
        tiny_model((4, 2))(random_input(2, 7, 5), state)


def test_state_of_the_wrong_type():
    with pytest.raises(TypeError, match="state"):
        tiny_model((4, 4))(random_input(2, 7, 5), (torch.zeros(1), torch.zeros(1)))


def test_streaming_a_bidirectional_model_is_refused():
    model = tiny_model((4, 4), bidirectional=True)
    causal_state = tiny_model((4, 4)).init_state(2)
    with pytest.raises(ValueError, match="bidirectional"):
        model(random_input(2, 7, 5), causal_state)
    with pytest.raises(ValueError, match="bidirectional"):
        model.init_state(2)
