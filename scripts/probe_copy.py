"""What a copy-trained hnae checkpoint has learned: per answer, per pool slot, per memory level.

    python scripts/probe_copy.py RUN_DIR [--lengths 200,500] [--sequences 256]

RUN_DIR is an `hnae train --out` directory (its latest checkpoint) or one checkpoint directory.
Run it with the same environment switches as the run (see scripts/copy_variant.py): they are
applied here too, so the model is rebuilt with the same shape. Prints, for each length T:

- the accuracy of each of the 10 answers, with the answer's place in its level-0 block;
- for each layer's level-1 pool, on the block that holds the symbols (block 0): for an attention
  pool, the share of each slot's attention on the 10 symbol places (uniform: 10/w_0) and the
  largest share one symbol place gets among the 10 (uniform: 0.10); near-uniform shares mean
  each slot holds a bag of the symbols, not their order. For a selecting pool
  (``summary_pool="select"``), how often each symbol place is among the items block 0 keeps;
- the share of each layer's attention, at the first and the middle answer step, on the
  level-1 memory (the summaries), with the position of the summary that gets the most.
"""
import argparse
import sys

import torch

import copy_variant  # noqa: F401  (applies the environment switches to the presets)
from hnae.inspect import trace_memory
from hnae.places import place_table
from hnae.pooling import SelectPool
from hnae_bench.evaluate_cli import load_trained
from hnae_bench.tasks import make_task

NUM_ANSWERS = 10


def load_model(path: str) -> torch.nn.Module:
    """The run's model as `hnae evaluate` rebuilds it (its write policy and positions included)."""
    return load_trained(path)[0]


def on_first_pools(model: torch.nn.Module, x: torch.Tensor, measure) -> list:
    """One forward of x; ``measure(pool, keys, values)`` on each layer's level-1 pool, in layer order."""
    results, hooks, encoder = [], [], model.body.encoder
    for (layer,) in encoder.layers:
        hooks.append(layer.attention.pools[0].register_forward_hook(
            lambda pool, inputs, _output: results.append(measure(pool, *inputs))))
    chunking, encoder.time_chunk = encoder.time_chunk, 0   # one call per layer: block 0 is in it
    with torch.no_grad():
        model(x)
    encoder.time_chunk = chunking
    for hook in hooks:
        hook.remove()
    return results


def pool_shares(pool, keys: torch.Tensor, _values) -> tuple[torch.Tensor, torch.Tensor]:
    """An attention pool: (share on the symbol places, largest share of one symbol place), each (H, K)."""
    keys = keys + place_table(pool, "place_keys").unsqueeze(1)  # (B, H, M, n, E)
    queries = pool.queries * pool.content_mask  # (H, K, E)
    weights = torch.einsum("hke,bhmne->bhmkn", queries, keys).mul(keys.shape[-1] ** -0.5).softmax(-1)
    mean = weights[:, :, 0, :, :NUM_ANSWERS].mean(0)  # block 0: (H, K, 10)
    return mean.sum(-1), mean.max(-1).values / mean.sum(-1)


def kept_symbol_places(pool, _keys, values: torch.Tensor) -> torch.Tensor:
    """A selecting pool: how often each of the 10 symbol places is kept in block 0, (10,)."""
    chosen = pool.salience_scores(values)[:, 0].topk(pool.slots, dim=-1).indices  # block 0: (B, K)
    return (chosen.unsqueeze(-1) == torch.arange(NUM_ANSWERS)).any(dim=1).float().mean(0)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run")
    parser.add_argument("--lengths", default="200,500")
    parser.add_argument("--sequences", type=int, default=256)
    args = parser.parse_args(argv)
    model = load_model(args.run)
    encoder = model.body.encoder
    block = encoder.layers[0][0].attention.windows[0]
    generator = torch.Generator().manual_seed(123)
    for length in (int(t) for t in args.lengths.split(",")):
        x, y = make_task("copy", length).sample(args.sequences, generator)  # (B, T+20, 10), (B, T+20)
        with torch.no_grad():
            answers = model(x).argmax(-1)[:, -NUM_ANSWERS:]
        accuracy = (answers == y[:, -NUM_ANSWERS:]).float().mean(0)  # (10,)
        first_answer = length + NUM_ANSWERS
        print(f"T = {length}: overall {accuracy.mean():.3f}")
        print("  answer place in block: " + " ".join(f"{(first_answer + i) % block:4d}" for i in range(NUM_ANSWERS)))
        print("  answer accuracy:       " + " ".join(f"{a:4.2f}" for a in accuracy.tolist()))
        selecting = isinstance(encoder.layers[0][0].attention.pools[0], SelectPool)
        for index, share in enumerate(on_first_pools(model, x[:32], kept_symbol_places) if selecting else []):
            print(f"  layer {index} pool keeps symbol place 0..9 of block 0 in: "
                  + " ".join(f"{v:4.2f}" for v in share.tolist()))
        for index, (on_symbols, largest) in enumerate([] if selecting else on_first_pools(model, x[:32], pool_shares)):
            print(f"  layer {index} pool, share on symbol places per slot (rows: heads):")
            print("    " + "\n    ".join(" ".join(f"{v:4.2f}" for v in row) for row in on_symbols.tolist()))
            print("    largest share of one symbol place: "
                  + " | ".join(" ".join(f"{v:4.2f}" for v in row) for row in largest.tolist()))
        for step in (first_answer, first_answer + NUM_ANSWERS // 2):
            trace = trace_memory(encoder, x[0], step)
            for index, layer in enumerate(trace["layers"]):
                for memory in layer["memory"][:1]:
                    pairs = [(w, p) for w, p in zip(memory["weights"], memory["positions"]) if p is not None]
                    total = sum(w for w, _ in pairs)
                    top = max(pairs)[1] if pairs else None
                    print(f"  step {step} layer {index}: {total:.2f} of attention on level-1 summaries "
                          f"(most on the one visible from {top})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
