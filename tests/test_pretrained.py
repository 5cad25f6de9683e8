"""save_pretrained / from_pretrained: exact round trips, no pickle, clear errors for tampered files."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hnae
from hnae.pretrained import CONFIG_FILE, FORMAT_KEY, WEIGHTS_FILE

from conftest import random_input, tiny_model

REPO = Path(__file__).resolve().parent.parent


def build(kind: str) -> hnae.HNAE:
    if kind == "two-layer":
        return tiny_model(windows=(4, 4), num_layers=2)
    if kind == "factored-places":
        return tiny_model(windows=(4, 3, 2), num_layers=2, place_rank=2)
    if kind == "selecting-pools":
        return tiny_model(windows=(4, 3, 2), num_layers=2, summary_pool="select", place_rank=2)
    torch.manual_seed(3)  # time-first layout, projection, no bias, three levels, float64
    return hnae.HNAE(4, 12, 2, bias=False, proj_size=6, windows=(2, 3, 2), num_heads=3,
                     summary_slots=1, ffn_multiplier=1.5).double().eval()


@pytest.fixture
def saved(tmp_path):
    model = tiny_model(windows=(4, 4), num_layers=2)
    model.save_pretrained(tmp_path / "model")
    return model, tmp_path / "model"


def edit_config(directory: Path, change) -> None:
    path = directory / CONFIG_FILE
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("kind", ["two-layer", "time-first-projected-float64", "factored-places", "selecting-pools"])
def test_round_trip_is_exact(tmp_path, kind):
    model = build(kind)
    model.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no temp files
    loaded = hnae.HNAE.from_pretrained(tmp_path / "saved")

    assert loaded.config == model.config and not loaded.training
    original, restored = model.state_dict(), loaded.state_dict()
    assert list(restored) == list(original)
    for name, tensor in original.items():
        assert restored[name].dtype == tensor.dtype and torch.equal(restored[name], tensor), name

    dtype = next(model.parameters()).dtype
    x = random_input(2, 23, model.input_size, dtype=dtype)  # (B, T, F)
    if not model.batch_first:
        x = x.transpose(0, 1)  # (T, B, F)
    with torch.no_grad():
        expected, expected_state = model(x)
        found, found_state = loaded(x)
        assert torch.equal(found, expected)  # bit for bit
        for a, b in zip(found_state.tensors(), expected_state.tensors()):
            assert torch.equal(a, b)
        step = x[:, :1] if model.batch_first else x[:1]
        assert torch.equal(loaded(step, found_state)[0], model(step, expected_state)[0])


def test_config_json_holds_the_config_and_the_format_version(saved):
    model, directory = saved
    data = json.loads((directory / CONFIG_FILE).read_text())
    assert data.pop(FORMAT_KEY) == 1
    assert data == model.config.to_dict()
    assert set(load_file(directory / WEIGHTS_FILE)) == set(model.state_dict())


def test_dtype_argument_converts_the_loaded_weights(saved):
    model, directory = saved
    loaded = hnae.HNAE.from_pretrained(directory, dtype=torch.float64, device="cpu")
    weight = "layers.0.0.attention.query_key_value.weight"
    assert loaded.state_dict()[weight].dtype == torch.float64
    assert torch.equal(loaded.state_dict()[weight].float(), model.state_dict()[weight])


def test_loading_never_unpickles(saved, monkeypatch):
    model, directory = saved

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained used pickle")

    class RefusingUnpickler:
        def __init__(self, *args, **kwargs):
            refuse()

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.serialization, "load", refuse)
    loaded = hnae.HNAE.from_pretrained(directory)
    assert torch.equal(loaded.state_dict()["layers.1.0.norm_output.weight"],
                       model.state_dict()["layers.1.0.norm_output.weight"])


def expect_error(directory: Path, file_name: str, *fragments: str) -> str:
    with pytest.raises(ValueError) as raised:
        hnae.HNAE.from_pretrained(directory)
    message = str(raised.value)
    assert str(directory / file_name) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_unknown_config_key_is_refused_by_name(saved):
    _, directory = saved
    edit_config(directory, lambda data: data.update(window_size=8))
    expect_error(directory, CONFIG_FILE, "unknown", "window_size")


@pytest.mark.parametrize("text", ['{"input_size": 5, "hidden_size"', "", "[1, 2]", "\xff\xfe not text"])
def test_config_that_is_not_a_json_object_is_refused(saved, text):
    _, directory = saved
    (directory / CONFIG_FILE).write_bytes(text.encode("latin-1"))
    expect_error(directory, CONFIG_FILE)


@pytest.mark.parametrize("key, value", [("hidden_size", "16"), ("num_layers", 2.0), ("bias", 1),
                                        ("windows", "4,4"), ("windows", [4, "4"]), ("windows", []),
                                        ("summary_slots", None), ("ffn_multiplier", "2")])
def test_wrong_type_is_refused_naming_the_key(saved, key, value):
    _, directory = saved
    edit_config(directory, lambda data: data.update({key: value}))
    expect_error(directory, CONFIG_FILE, key)


def test_missing_key_and_format_version_are_refused(saved):
    _, directory = saved
    edit_config(directory, lambda data: data.pop("hidden_size"))
    expect_error(directory, CONFIG_FILE, "hidden_size", "missing")
    edit_config(directory, lambda data: data.update(hidden_size=16, **{FORMAT_KEY: 2}))
    expect_error(directory, CONFIG_FILE, FORMAT_KEY)
    edit_config(directory, lambda data: data.pop(FORMAT_KEY))
    expect_error(directory, CONFIG_FILE, FORMAT_KEY, "missing")


@pytest.mark.parametrize("windows, tensor", [([4, 5], "age_keys"), ([5, 4], "place_keys"),
                                             ([4, 4, 4], "missing tensors")])
def test_changed_windows_that_weights_do_not_fit_are_refused(saved, windows, tensor):
    _, directory = saved
    edit_config(directory, lambda data: data.update(windows=windows, write_policy="all", threshold=None, budget=None))
    expect_error(directory, WEIGHTS_FILE, str(directory / CONFIG_FILE), tensor)


def test_missing_and_extra_tensors_are_reported_by_name(saved):
    _, directory = saved
    tensors = load_file(directory / WEIGHTS_FILE)
    tensors.pop("layers.1.0.feed_forward.0.bias")
    tensors["layers.1.0.surprise"] = torch.zeros(3)
    save_file(tensors, directory / WEIGHTS_FILE)
    expect_error(directory, WEIGHTS_FILE, "layers.1.0.feed_forward.0.bias", "layers.1.0.surprise")


@pytest.mark.parametrize("keep", [0, 7, 100, -200, -1])
def test_truncated_weights_are_refused(saved, keep):
    _, directory = saved
    path = directory / WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    expect_error(directory, WEIGHTS_FILE, "truncated or corrupt")


def test_corrupt_weights_header_is_refused(saved):
    _, directory = saved
    path = directory / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[8:40] = b"#" * 32  # inside the JSON header
    path.write_bytes(bytes(data))
    expect_error(directory, WEIGHTS_FILE)


def test_missing_files_and_directories_are_named(saved, tmp_path):
    _, directory = saved
    with pytest.raises(FileNotFoundError, match="nowhere"):
        hnae.HNAE.from_pretrained(tmp_path / "nowhere")
    (directory / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        hnae.HNAE.from_pretrained(directory)


def test_save_refuses_other_modules(tmp_path):
    with pytest.raises(TypeError, match="hnae.HNAE"):
        hnae.pretrained.save_pretrained(torch.nn.LSTM(3, 4), tmp_path / "lstm")


def test_the_library_does_not_import_safetensors_until_asked():
    code = "import sys, hnae; hnae.HNAE(2, 8, windows=(2, 2)); print('safetensors' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_missing_safetensors_gives_an_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match=r"hnae\[bench\]"):
        tiny_model().save_pretrained(tmp_path / "model")
