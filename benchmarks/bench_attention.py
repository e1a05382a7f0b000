"""Attention forward + backward on the CPU: PyTorch's fused (flash) kernel against the math kernel,
side by side in one run, for the sequence lengths our recipes use (the choice in
``dino_bridge.models.layers.attention``).

    python benchmarks/bench_attention.py --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

CASES = [  # (label, batch, heads, tokens, head dim)
    ("quickstart global 28/7 (17 tokens)", 128, 4, 17, 32),
    ("quickstart local 14/7 (5 tokens)", 384, 4, 5, 32),
    ("96/16 local + 4 storage (41 tokens)", 64, 6, 41, 64),
    ("224/16 global + 4 storage (201 tokens)", 8, 6, 201, 64),
]


def timed(backend, q, k, v, repeats: int) -> float:
    with sdpa_kernel(backend):
        for _ in range(2):
            F.scaled_dot_product_attention(q, k, v).sum().backward()
        start = time.perf_counter()
        for _ in range(repeats):
            F.scaled_dot_product_attention(q, k, v).sum().backward()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads")
    print("| case | dtype | flash ms | math ms | flash / math |")
    print("|---|---|---|---|---|")
    for label, b, h, n, d in CASES:
        for dtype in (torch.bfloat16, torch.float32):
            q, k, v = (torch.randn(b, h, n, d, dtype=dtype, requires_grad=True) for _ in range(3))
            flash = timed(SDPBackend.FLASH_ATTENTION, q, k, v, args.repeats)
            math_ = timed(SDPBackend.MATH, q, k, v, args.repeats)
            name = str(dtype).removeprefix("torch.")
            print(f"| {label} | {name} | {flash * 1e3:.2f} | {math_ * 1e3:.2f} | {flash / math_:.2f} |")


if __name__ == "__main__":
    main()
