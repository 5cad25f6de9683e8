"""`hnae evaluate`: a trained checkpoint scored at other lengths, agreeing with `hnae train --generalise`."""
import json

import pytest
import torch

import hnae
from hnae_bench.evaluate_cli import main
from hnae_bench.train import TrainConfig, train


def trained_run(tmp_path, model, **overrides):
    config = TrainConfig(task="copy", seq_len=5, model=model, steps=3, batch_size=8, eval_every=3, eval_batches=1,
                         checkpoint_every=3, progress=False, out=str(tmp_path / model), generalise=(7, 12),
                         **overrides)
    return train(config)


@pytest.mark.parametrize("model, overrides", [("hnae", {}), ("lstm", {}),
                                              ("hnae", {"write_policy": "novelty", "threshold": 0.9}),
                                              ("hnae", {"positions": "relative"})])
def test_it_reproduces_the_generalisation_records_of_the_training_run(tmp_path, capsys, model, overrides):
    result = trained_run(tmp_path, model, **overrides)
    out = tmp_path / "records.json"
    assert main(["--checkpoint", str(tmp_path / model), "--seq-lens", "7,12", "--json", str(out),
                 "--no-progress"]) == 0
    records = json.loads(out.read_text())["records"]
    assert [r["seq_len"] for r in records] == [7, 12]
    for found, expected in zip(records, result.generalisation):
        assert found["sequences"] == expected["sequences"] == 16
        assert found["metrics"] == expected["metrics"]  # the same weights, sequences and order of sums
    printed = capsys.readouterr().out
    assert f"{model} trained on copy at T=5" in printed and "T=     12: accuracy" in printed


def test_a_checkpoint_directory_works_as_well_as_the_run_directory(tmp_path, capsys):
    trained_run(tmp_path, "lstm")
    assert main(["--checkpoint", str(tmp_path / "lstm" / "ckpt-000003"), "--seq-lens", "7", "--no-progress"]) == 0
    assert "T=      7" in capsys.readouterr().out


def test_refusals_name_the_problem(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "missing"), "--seq-lens", "7"]) == 1
    assert "not a directory" in capsys.readouterr().err
    hnae.HNAE(3, 8, windows=(4, 2)).save_pretrained(tmp_path / "encoder")
    assert main(["--checkpoint", str(tmp_path / "encoder"), "--seq-lens", "7"]) == 1
    assert "not a hnae train checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tmp_path), "--seq-lens", "12,7"])
    assert "increasing" in capsys.readouterr().err
    trained_run(tmp_path, "lstm")
    assert main(["--checkpoint", str(tmp_path / "lstm"), "--seq-lens", "7", "--device", "bogus"]) == 1
    assert "bogus" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["--checkpoint", str(tmp_path / "lstm"), "--seq-lens", "7", "--device", "cuda"]) == 1
        assert "use --device cpu" in capsys.readouterr().err


def test_the_committed_h200_copy_model_still_solves_t_10000(capsys, tmp_path):
    """The README's check of the GPU result: the saved weights copy at T = 10,000 on the CPU.
    It fails if the model's computation changes under the weights it was trained with."""
    from pathlib import Path
    checkpoint = Path(__file__).resolve().parents[1] / "docs/gpu/h200-long-2026-11-27/copy10000-model"
    out = tmp_path / "records.json"
    assert main(["--checkpoint", str(checkpoint), "--seq-lens", "10000", "--sequences", "4", "--no-progress",
                 "--json", str(out)]) == 0
    (record,) = json.loads(out.read_text())["records"]
    assert record["solved"] and record["metrics"]["accuracy"] >= 0.99


@pytest.mark.parametrize("folder", ["length-free-2026-11-27", "length-free-conv-2026-11-27"])
def test_the_committed_length_free_copy_models_copy_ten_times_further(tmp_path, folder):
    """docs/RESULTS.md, length generalisation: trained at T = 1000 (positions="relative", novelty
    memory; the second with short_conv=16), they copy at T = 10,000. It fails if the model's
    computation changes under their weights."""
    from pathlib import Path
    checkpoint = Path(__file__).resolve().parents[1] / "docs/cpu" / folder / "model"
    out = tmp_path / "records.json"
    assert main(["--checkpoint", str(checkpoint), "--seq-lens", "10000", "--sequences", "4", "--no-progress",
                 "--json", str(out)]) == 0
    (record,) = json.loads(out.read_text())["records"]
    assert json.loads((checkpoint / "config.json").read_text())["train"]["seq_len"] == 1000
    assert record["solved"] and record["metrics"]["accuracy"] >= 0.99


def test_the_committed_adding_model_beats_the_tcn_papers_best_mse(tmp_path):
    """docs/RESULTS.md, adding at T = 600 on the CPU: below the TCN paper's best MSE (5.3e-5) on 1,024
    held-out sequences (seeded, so the figure is the same each run). It fails if the model's
    computation changes under its weights."""
    from pathlib import Path
    checkpoint = Path(__file__).resolve().parents[1] / "docs/cpu/adding-2026-11-28/adding600-model"
    out = tmp_path / "records.json"
    assert main(["--checkpoint", str(checkpoint), "--seq-lens", "600", "--sequences", "1024", "--no-progress",
                 "--json", str(out)]) == 0
    (record,) = json.loads(out.read_text())["records"]
    assert json.loads((checkpoint / "config.json").read_text())["train"]["task"] == "adding"
    assert record["metrics"]["mse"] < 5.3e-5


def test_the_committed_selective_copy_model_beats_mambas_figure_at_4096(tmp_path):
    """docs/RESULTS.md, selective copy on the CPU: 4 event counters per layer, trained up a ladder to
    T = 4096, copies the 16 tokens at >= 99.8% (the Mamba paper's figure) on held-out sequences. It
    fails if the model's computation (the counts included) changes under its weights."""
    from pathlib import Path
    checkpoint = Path(__file__).resolve().parents[1] / "docs/cpu/selective-2026-11-28/model"
    out = tmp_path / "records.json"
    assert main(["--checkpoint", str(checkpoint), "--seq-lens", "4096", "--sequences", "64", "--no-progress",
                 "--json", str(out)]) == 0
    (record,) = json.loads(out.read_text())["records"]
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["train"]["task"] == "selective_copy" and config["model_config"]["event_counters"] == 4
    assert record["metrics"]["accuracy"] >= 0.998
