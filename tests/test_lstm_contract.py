"""Whatever nn.LSTM accepts, HNAE accepts, with the same output shapes and types."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import hnae

INPUT, HIDDEN = 5, 16


def pair(**options):
    torch.manual_seed(0)
    lstm = nn.LSTM(INPUT, HIDDEN, **options)
    model = hnae.HNAE(INPUT, HIDDEN, **options, windows=(4, 4), num_heads=2)
    return lstm, model


FORMS = {
    "unbatched": lambda bf: torch.randn(11, INPUT),
    "batched": lambda bf: torch.randn(3, 11, INPUT) if bf else torch.randn(11, 3, INPUT),
}


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("options", [{}, {"num_layers": 2, "dropout": 0.1}, {"bidirectional": True},
                                     {"proj_size": 4}, {"num_layers": 2, "bidirectional": True, "proj_size": 3}])
def test_output_shape_and_type_match_lstm(form, batch_first, options):
    lstm, model = pair(batch_first=batch_first, **options)
    x = FORMS[form](batch_first)
    expected, _ = lstm(x)
    actual, state = model(x)
    assert type(actual) is type(expected)
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    if options.get("bidirectional"):
        assert state is None
    else:
        assert isinstance(state, hnae.HNAEState)


@pytest.mark.parametrize("options", [{}, {"bidirectional": True, "num_layers": 2}])
@pytest.mark.parametrize("batch_first", [False, True])
def test_packed_sequence_in_packed_sequence_out(options, batch_first):
    lstm, model = pair(batch_first=batch_first, **options)
    lengths = torch.tensor([4, 9, 2])
    x = torch.randn(3, 9, INPUT)
    packed = pack_padded_sequence(x if batch_first else x.transpose(0, 1), lengths,
                                  batch_first=batch_first, enforce_sorted=False)
    expected, _ = lstm(packed)
    actual, _ = model(packed)
    assert isinstance(actual, PackedSequence)
    assert actual.data.shape == expected.data.shape
    assert torch.equal(actual.batch_sizes, expected.batch_sizes)
    assert torch.equal(actual.sorted_indices, expected.sorted_indices)
    assert torch.equal(actual.unsorted_indices, expected.unsorted_indices)


def test_constructor_mirrors_lstm_attributes():
    lstm, model = pair(num_layers=2, batch_first=True, bidirectional=True, proj_size=4, dropout=0.2)
    for name in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                 "bidirectional", "proj_size"):
        assert getattr(model, name) == getattr(lstm, name), name


class SequenceClassifier(nn.Module):
    """A model written for nn.LSTM; the test swaps the recurrent class and nothing else."""

    def __init__(self, recurrent_class, **extra):
        super().__init__()
        self.rnn = recurrent_class(3, 24, 2, batch_first=True, **extra)
        self.head = nn.Linear(24, 2)

    def forward(self, x):
        output, _ = self.rnn(x)
        return self.head(output[:, -1])


def test_a_model_written_for_lstm_trains_with_hnae_swapped_in():
    torch.manual_seed(0)
    model = SequenceClassifier(hnae.HNAE)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)

    def batch():
        x = torch.randn(32, 30, 3, generator=generator)
        return x, (x[:, 2, 0] > 0).long()  # the label is the sign of an early input

    losses = []
    for _ in range(300):
        x, y = batch()
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    x, y = batch()
    accuracy = (model(x).argmax(-1) == y).float().mean().item()
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert accuracy >= 0.9
