"""Padding never leaks: each sequence of a padded batch gets what it gets alone."""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from conftest import random_input, tiny_model

LENGTHS = [23, 9, 40, 1]


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("form", ["lengths", "packed"])
@pytest.mark.parametrize("windows,num_layers", [((4, 4), 2), ((7, 5, 3), 1)])
@pytest.mark.parametrize("pool", ["attention", "select"])
def test_each_sequence_as_if_alone(bidirectional, form, windows, num_layers, pool):
    model = tiny_model(windows, num_layers, bidirectional=bidirectional, summary_pool=pool)
    x = random_input(len(LENGTHS), max(LENGTHS), 5)
    lengths = torch.tensor(LENGTHS)
    garbage = x.clone()
    for row, length in enumerate(LENGTHS):
        garbage[row, length:] = float("nan")  # whatever sits in the padding must not matter
    with torch.no_grad():
        if form == "lengths":
            output, state = model(garbage, lengths=lengths)
        else:
            packed = pack_padded_sequence(garbage, lengths, batch_first=True, enforce_sorted=False)
            packed_output, state = model(packed)
            output, output_lengths = pad_packed_sequence(packed_output, batch_first=True)
            assert output_lengths.tolist() == LENGTHS
        for row, length in enumerate(LENGTHS):
            alone, alone_state = model(x[row:row + 1, :length])
            assert (output[row, :length] - alone[0]).abs().max().item() <= 1e-5
            assert torch.all(output[row, length:] == 0)
            if not bidirectional:
                for a, b in zip(state.select([row]).tensors(), alone_state.tensors()):
                    assert (a - b).abs().max().item() <= 1e-5
