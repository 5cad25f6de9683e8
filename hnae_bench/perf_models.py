"""The models of ``hnae bench perf``: built once in the parent, shipped to each measurement's child.

``build_perf_model`` gives a bench model (``hnae_bench.models.build_model`` at a
preset's parameter budget, on a stand-in task of float features) or the
reference streaming model ``hnae-2x128``. The parent pickles each model once
(``serialise_model``) so that children skip the width fit; a model that does not
pickle (pytorch-tcn's weight-norm parametrisations) is rebuilt in the child.
``describe_models`` builds the run's models and records what each is.
"""
from __future__ import annotations

import io

import torch
from torch import nn

from hnae_bench.models import build_model, count_parameters
from hnae_bench.peers import ModelUnavailable
from hnae_bench.tasks import Task

REFERENCE_STEP_MODEL = "hnae-2x128"   # hnae.HNAE(C, 128, num_layers=2), the library's default windows
REFERENCE_COMPILED = "hnae-2x128-compiled"   # the same model, streamed through HNAE.compile_step


class RandomFeatures(Task):
    """A stand-in task for ``build_model``: C = K = ``input_size`` float features per step, no targets."""
    name = "random_features"

    def __init__(self, seq_len: int, input_size: int):
        super().__init__(seq_len)
        self.input_size = self.output_size = input_size
        self.total_length = seq_len
        self.chance_loss = float("nan")


def serialise_model(model: nn.Module, limit_bytes: int = 64 * 2 ** 20) -> bytes | None:
    """The pickled model, or None where it cannot be pickled (pytorch-tcn's weight-norm
    parametrisations) or is larger than ``limit_bytes`` (a quadratic mask buffer)."""
    buffer = io.BytesIO()
    try:
        torch.save(model, buffer)
    except Exception:  # noqa: BLE001 - whatever stops pickling, the child builds the model itself
        return None
    return buffer.getvalue() if buffer.tell() <= limit_bytes else None


def load_job_model(job: dict) -> nn.Module:
    """The job's model on its device: unpickled from ``model_bytes`` when the parent sent them, else built."""
    if job.get("model_bytes"):
        model = torch.load(io.BytesIO(job["model_bytes"]), weights_only=False)
    else:
        model = build_perf_model(job["name"], job["preset"], job["input_size"], job["max_len"])
    return model.to(job["device"])


def build_perf_model(name: str, preset: str, input_size: int, max_len: int) -> nn.Module:
    """The model ``name`` at ``preset``'s parameter budget, reaching ``max_len`` steps, with
    ``model_config`` filled in; seeded, so that parent and child build the same weights."""
    torch.manual_seed(0)
    if name in (REFERENCE_STEP_MODEL, REFERENCE_COMPILED):
        import hnae

        model = hnae.HNAE(input_size, 128, num_layers=2, batch_first=True)
        model.model_config = {"name": name, "width": 128, "num_layers": 2, "windows": list(model.windows),
                              "parameters": count_parameters(model), "max_len": max_len,
                              "receptive_field": model.receptive_field,
                              "compiled_step": name == REFERENCE_COMPILED}
        return model
    return build_model(name, RandomFeatures(max_len, input_size), preset, max_len)


def describe_models(settings: dict, say, payloads: dict) -> dict:
    """Build every model once in this process for its record: {name: {status, max_len, config}}.
    ``payloads[name]`` gets the pickled model where it pickles (children then skip the build).

    Built for the longest T of the run; a model that refuses or fails at that
    length is built for the longest shorter T it accepts (and measured up to it);
    ``refused_longer`` keeps the status and error of the longer length.
    """
    longest = max(settings["seq_lens"])
    names = list(dict.fromkeys(settings["models"] + (settings["stream_models"] if settings["stream"] else [])))
    described = {}
    for name in names:
        entry = {}
        for max_len in [longest] + sorted(set(settings["seq_lens"]) - {longest}, reverse=True):
            try:
                model = build_perf_model(name, settings["preset"], settings["input_size"], max_len)
                entry = {"status": "ok", "max_len": max_len, "config": model.model_config,
                         **({"refused_longer": entry} if entry else {})}
                payloads[name] = serialise_model(model)
                break
            except ModelUnavailable as error:
                entry = {"status": "unavailable", "error": str(error)}
            except Exception as error:  # noqa: BLE001 - a model that cannot be built is one row's status
                entry = {"status": "error", "error": f"{type(error).__name__}: {error}"}
        described[name] = entry
        say(f"  {name}: " + (f"{entry['config']['parameters']:,} parameters, width {entry['config'].get('width')}, "
                             f"built for T <= {entry['max_len']:,}" if entry["status"] == "ok"
                             else f"{entry['status']}: {entry['error'][:160]}"))
    return described
