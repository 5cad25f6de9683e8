"""``hnae inspect --plot``: the memory trace plot, the printed summary, and the refusals."""

import json
import re

import pytest
import torch

import hnae
from hnae_bench import inspect_cli
from hnae_bench.inspect_plot import build_figure, plot_memory_trace
from hnae_bench.tasks import make_task

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# (write-policy options, windows, layers): "all" on a 3-level, 2-layer stack; novelty as in the README
CASES = {
    "all": ([], "2,4,4", 2),
    "novelty": (["--write-policy", "novelty", "--threshold", "0.9"], "1,16", 1),
}


def _run(argv, capsys):
    code = inspect_cli.main(argv)
    return code, capsys.readouterr().out


@pytest.mark.parametrize("policy", sorted(CASES))
def test_the_cli_plots_a_task_sample_and_prints_what_the_trace_holds(policy, tmp_path, capsys):
    options, windows, layers = CASES[policy]
    path = tmp_path / "plots" / f"{policy}.png"  # the folder does not exist yet
    code, out = _run(["--windows", windows, "--hidden-size", "16", "--num-layers", str(layers), *options,
                      "--task", "redundant_stream", "--seq-len", "30", "--seed", "3", "--plot", str(path)], capsys)
    assert code == 0, out
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000
    # the same model (init seeded with --seed) on the same sample (generator seeded with --seed)
    task = make_task("redundant_stream", 30)
    x, _ = task.sample(1, torch.Generator().manual_seed(3))
    torch.manual_seed(3)
    model = hnae.HNAE(task.input_size, 16, layers, windows=tuple(int(w) for w in windows.split(",")),
                      write_policy="novelty" if policy == "novelty" else "all",
                      threshold=0.9 if policy == "novelty" else None)
    trace = hnae.trace_memory(model, x[0])
    expected = {(index, entry["level"]): (sum(entry["written"]), len(entry["ready"]))
                for index, layer in enumerate(trace["layers"]) for entry in layer["levels"]}
    printed = {(int(layer), int(level)): (int(written), int(total)) for layer, level, written, total
               in re.findall(r"^layer (\d+) level (\d+): written (\d+)/(\d+) candidates$", out, flags=re.M)}
    assert printed == expected
    assert len(printed) == layers * (len(windows.split(",")) - 1)
    if policy == "all":
        assert all(written == total for written, total in printed.values())
    else:
        assert all(written < total for written, total in printed.values())  # novelty skipped repeats
    # the attention shares depend on every weight: they pin the model init to the seed
    for index, layer in enumerate(trace["layers"]):
        line = re.search(rf"^layer {index} attention of step {trace['length'] - 1}: (.+)$", out, flags=re.M)
        shares = dict((part.rsplit(" ", 1)[0], float(part.rsplit(" ", 1)[1])) for part in line.group(1).split(", "))
        assert shares["local"] == pytest.approx(sum(layer["local"]["weights"]), abs=1e-3)
        for part in layer["memory"]:
            assert shares[f"level {part['level']}"] == pytest.approx(sum(part["weights"]), abs=1e-3)


def test_step_counts_from_the_end_and_out_of_range_is_refused(tmp_path, capsys):
    base = ["--windows", "2,4", "--hidden-size", "16", "--task", "sparse_signal", "--seq-len", "20",
            "--plot", str(tmp_path / "trace.png")]  # T = 20 + 8 queries = 28
    code, out = _run([*base, "--step", "-5", "--json"], capsys)
    assert code == 0, out
    assert json.loads(out)["trace"]["step"] == 23
    for step in ("28", "-29"):
        code, out = _run([*base, "--step", step], capsys)
        assert code == 2
        assert out.strip().count("\n") == 0 and "--step" in out and "28 steps" in out, out


def test_refusals_and_describe_write_policy(tmp_path, capsys):
    code, out = _run(["--windows", "4,4,4", "--write-policy", "novelty", "--threshold", "0.8", "--json"], capsys)
    assert code == 0
    facts = json.loads(out)
    assert (facts["write_policy"], facts["threshold"], facts["budget"]) == (["novelty"] * 2, [0.8] * 2, [None] * 2)
    code, out = _run(["--windows", "4,4", "--write-policy", "learned", "--budget", "0.3", "--json"], capsys)
    assert (json.loads(out)["write_policy"], json.loads(out)["budget"]) == (["learned"], [0.3])
    assert _run(["--windows", "4,4", "--threshold", "0.8"], capsys)[0] == 2  # no novelty level uses it
    assert _run(["--windows", "4,4", "--plot", str(tmp_path / "p.png")], capsys)[0] == 2  # no --task
    assert _run(["--windows", "4,4", "--step", "3"], capsys)[0] == 2  # --step without --plot
    assert not (tmp_path / "p.png").exists()
    # a checkpoint whose input size is not the task's: one line, exit 2
    hnae.HNAE(3, 16, windows=(4, 4)).save_pretrained(tmp_path / "model")
    code, out = _run(["--checkpoint", str(tmp_path / "model"), "--task", "redundant_stream", "--seq-len", "10",
                      "--plot", str(tmp_path / "c.png")], capsys)
    assert code == 2
    assert out.strip().count("\n") == 0 and "input_size 3" in out and "redundant_stream" in out, out
    task = make_task("redundant_stream", 10)
    hnae.HNAE(task.input_size, 16, windows=(4, 4)).save_pretrained(tmp_path / "fits")
    code, out = _run(["--checkpoint", str(tmp_path / "fits"), "--task", "redundant_stream", "--seq-len", "10",
                      "--plot", str(tmp_path / "c.png")], capsys)
    assert code == 0, out
    assert (tmp_path / "c.png").read_bytes().startswith(PNG_MAGIC)


def _stems(figure, gid):
    """x positions of the stems (vlines) with this gid."""
    found = [c for axes in figure.axes for c in axes.collections if c.get_gid() == gid]
    assert len(found) == 1, gid
    return sorted(float(segment[0][0]) for segment in found[0].get_segments())


def test_the_plot_skips_empty_slots_and_positions_before_the_sequence(tmp_path):
    trace = {"length": 10, "step": 2, "layers": [{
        "levels": [{"level": 1, "ready": [2, 4, 6, 8, 10], "written": [True, False, True, False, True]}],
        "local": {"positions": [-1, 0, 1, 2], "weights": [0.0, 0.1, 0.2, 0.3]},
        "memory": [{"level": 1, "positions": [None, None, None, 2], "weights": [0.0, 0.0, 0.0, 0.4]}],
    }]}
    x = torch.randn(10, 3)
    figure = build_figure(trace, x, "synthetic")
    assert _stems(figure, "attention layer 0 local") == [0.0, 1.0, 2.0]
    assert _stems(figure, "attention layer 0 level 1") == [2.0]
    lines = {line.get_gid(): list(line.get_xdata()) for axes in figure.axes for line in axes.lines}
    assert lines["written layer 0 level 1"] == [2, 6, 10]
    assert lines["skipped layer 0 level 1"] == [4, 8]
    labels = [label.get_text() for axes in figure.axes for label in axes.get_yticklabels()]
    assert "layer 0 level 1: 3/5 written" in labels
    assert figure.axes[-1].get_xlim()[1] > 10  # the item ready at T = 10 (after the sequence) is shown
    assert len(figure.axes) == 3  # input, events, one attention panel
    path = plot_memory_trace(trace, None, tmp_path / "none.png", "no input")
    assert path.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="traced sequence"):
        build_figure(trace, torch.randn(9, 3), "wrong length")
