"""Does this CPU run bf16 matmuls natively? fp32 and bf16 512x512 matmuls, alternating, 3 repeats.

    python benchmarks/bench_cpu_bf16.py

Prints oneDNN's bf16 check (``dino_bridge.distributed.device.cpu_has_fast_bf16``), the ms per
matmul of each dtype per repeat and the bf16 / fp32 ratio per repeat."""

from __future__ import annotations

import time

import torch

from dino_bridge.distributed.device import cpu_has_fast_bf16

DTYPES = (torch.float32, torch.bfloat16)


def main(size: int = 512, calls: int = 10, repeats: int = 3) -> None:
    operands = {dt: (torch.randn(size, size, dtype=dt), torch.randn(size, size, dtype=dt)) for dt in DTYPES}
    ms: dict[torch.dtype, list[float]] = {dt: [] for dt in DTYPES}
    for _ in range(repeats):
        for dt in DTYPES:  # alternating, so a change of machine load hits both
            x, y = operands[dt]
            x @ y  # warm-up
            start = time.perf_counter()
            for _ in range(calls):
                x @ y
            ms[dt].append((time.perf_counter() - start) / calls * 1e3)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {cpu_has_fast_bf16()}")
    for dt in DTYPES:
        print(f"{dt}: " + ", ".join(f"{t:.2f}" for t in ms[dt]) + " ms per matmul")
    ratios = [b / f for f, b in zip(ms[torch.float32], ms[torch.bfloat16])]
    print("bf16 / fp32 per repeat: " + ", ".join(f"{r:.1f}x" for r in ratios))


if __name__ == "__main__":
    main()
