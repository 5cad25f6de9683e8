"""The race report's speed section: hnae against nn.LSTM in training tokens/s, measured by
``hnae bench perf`` (its own report lands in ``<run>/perf/``) at the profile's ``speed_seq_lens``.

The race itself uses small models and short T, where an LSTM's tokens/s is high; this section
trains both at the profile's ``speed_preset`` (about 0.4M parameters for ``large``) and long T.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path


def speed_check(settings: dict, out_dir: Path) -> dict:
    """{command, report, rows: [{T, hnae, lstm, ratio}]} or {skipped}."""
    lengths = list(settings.get("speed_seq_lens") or ())
    if not lengths:
        return {"skipped": "not in this profile"}
    if "hnae" not in settings["models"] or "lstm" not in settings["models"]:
        return {"skipped": "needs hnae and lstm in --models"}
    from hnae_bench import perf   # the perf bench, only when this section runs

    argv = ["--models", "hnae,lstm", "--seq-lens", ",".join(str(n) for n in lengths), "--repeats", "1",
            "--no-stream", "--preset", settings["speed_preset"], "--device", settings["device"]]
    argv += list(settings.get("speed_options", ()))
    status = perf.main(argv + ["--out", str(out_dir)])
    path = out_dir / "perf" / "perf.json"
    if status != 0 or not path.exists():
        return {"skipped": f"hnae bench perf {shlex.join(argv)} ended with status {status}"}
    training = json.loads(path.read_text())["training"]
    rows = []
    for steps in lengths:
        rates = {name: training.get(name, {}).get(str(steps), {}).get("summary", {}).get("train_tokens_per_second")
                 for name in ("hnae", "lstm")}
        statuses = {name: training.get(name, {}).get(str(steps), {}).get("status", "not run") for name in rates}
        ratio = rates["hnae"] / rates["lstm"] if rates["hnae"] and rates["lstm"] else None
        rows.append({"seq_len": steps, **rates, "ratio": ratio, "status": statuses})
    return {"command": "hnae bench perf " + shlex.join(argv), "report": "perf/report.md", "rows": rows,
            "preset": settings["speed_preset"]}
