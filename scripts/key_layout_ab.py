"""Micro A/B for the streaming step's key layout: one step's scores, softmax and weighted sum,
compiled, with keys stored (B, H, w, E) as the state holds them today or transposed (B, H, E, w).

    python scripts/key_layout_ab.py

Shapes: batch 32, 8 heads of 16 (width 128), 200 keys (a 100-step ring and 100 summary slots,
about what one layer of `HNAE(64, 128, num_layers=2)` holds). Prints the median of 7 x 200 calls
per layout, three alternating rounds.
"""
import time

import torch

BATCH, HEADS, HEAD_WIDTH, KEYS = 32, 8, 16, 200


def attend_rows(queries, keys, values):  # keys (B, H, w, E)
    scores = torch.matmul(queries, keys.transpose(-1, -2)) * HEAD_WIDTH ** -0.5  # (B, H, 1, w)
    return torch.matmul(scores.softmax(-1), values)  # (B, H, 1, E)


def attend_columns(queries, keys_transposed, values):  # keys (B, H, E, w)
    scores = torch.matmul(queries, keys_transposed) * HEAD_WIDTH ** -0.5  # (B, H, 1, w)
    return torch.matmul(scores.softmax(-1), values)  # (B, H, 1, E)


def median_ms(function, *args, calls: int = 200, repeats: int = 7) -> float:
    for _ in range(20):
        function(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            function(*args)
        times.append((time.perf_counter() - start) / calls * 1e3)
    return sorted(times)[repeats // 2]


def main() -> None:
    torch.manual_seed(0)
    queries = torch.randn(BATCH, HEADS, 1, HEAD_WIDTH)
    keys, values = torch.randn(BATCH, HEADS, KEYS, HEAD_WIDTH), torch.randn(BATCH, HEADS, KEYS, HEAD_WIDTH)
    keys_transposed = keys.transpose(-1, -2).contiguous()
    rows, columns = torch.compile(attend_rows), torch.compile(attend_columns)
    torch.testing.assert_close(rows(queries, keys, values), columns(queries, keys_transposed, values))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for round_index in range(3):
        print(f"round {round_index}: keys (B, H, w, E) {median_ms(rows, queries, keys, values):.3f} ms, "
              f"keys (B, H, E, w) {median_ms(columns, queries, keys_transposed, values):.3f} ms")


if __name__ == "__main__":
    main()
