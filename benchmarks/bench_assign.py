"""Time per call of the teacher-target assigners next to the memory-traffic floor.

Legend: N rows (teacher outputs per call), K prototypes, D bottleneck width, C DTCH window rows,
T teacher temperature.

    python benchmarks/bench_assign.py                       # K = 65 536, N = 128 and 3 771
    python benchmarks/bench_assign.py --quick --json out.json

Methods: ``softmax_centering`` (DINO), ``sinkhorn_3`` (3 Sinkhorn-Knopp iterations) and ``dtch``
in its steady state (window full, ``collect_target_entropy`` off, as on the trainer's unlogged
iterations); ``dtch_entropy`` is the same instance with the entropy on (logged iterations).

Logits are teacher-like: a fixed prototype matrix W [K, D] with unit rows (the weight-normalised
last layer of the DINO head, D = 256) times unit bottleneck features z [N, D], each z a random
prototype plus noise, so that z·w is about 0.55 for its own prototype and N(0, 1/D) for the
others: Z ∈ [-1, 1] and Z/T spans about [-4.5, 9] at T = 0.07, a peaked row. The cost does not
depend on T: every method makes the same passes for any T, and with |Z| ≤ 1 no exp reaches the
fp32 subnormals (slow on some CPUs) for T ≥ 0.04, so ``--teacher-temp 0.04`` times the same.

Timing: each call gets fresh logits drawn before its timer starts; DTCH is first called until
``history_full`` (C = history // N calls, fresh logits each), then every method gets a few
warm-up calls; the R timed repeats interleave the methods (rotating their order) so that machine
noise hits them alike; CUDA is synchronised around each call. Per method: median, quartiles and
minimum; the DTCH/Sinkhorn ratio is the median of the per-repeat ratios. On CPU the output's
allocation (page faults of a fresh N×K buffer) is part of the call, as it is in training.

Floor: a method must read the fp32 logits once and write the fp32 probs once, 2·N·K·4 bytes.
DTCH must also re-sum the window block that the push changed and add the block sums: read ⌈√C⌉
fp32 rows and ⌈C/⌈√C⌉⌉ fp64 block sums of K, write one row and one block sum. That is not
negligible at N = 128 (C = 312: 18 rows + 18 sums, +22 % over 2·N·K·4) but is at N = 3 771
(C = 10: +0.2 %), so DTCH's floor includes it. floor = bytes / copy bandwidth, the best of a few
``dst.copy_(src)`` of a large fp32 tensor, counting bytes read + written. The O(K) fp64 vector
math of DTCH (boost, weights) is not in its floor.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._report import cpu_model, synchronize  # noqa: E402
from dino_bridge.assign import DTCH, SinkhornKnopp, SoftmaxCentering  # noqa: E402
from dino_bridge.assign.dtch_math import window_block_rows  # noqa: E402

BOTTLENECK_DIM = 256
WARMUP_CALLS = 2
FULL = {"k": 65536, "sizes": [128, 3771], "history": 40000, "repeats": 10, "copy_mb": 256}
QUICK = {"k": 2048, "sizes": [32, 96], "history": 256, "repeats": 3, "copy_mb": 16}
METHODS = ("softmax_centering", "sinkhorn_3", "dtch", "dtch_entropy")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The CLI; unset sizes fall back to the full (or ``--quick``) defaults."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: as is)")
    parser.add_argument("--repeats", type=int, help="timed calls per method and size")
    parser.add_argument("--sizes", type=int, nargs="+", help="rows N per call (default 128 3771)")
    parser.add_argument("--k", type=int, help="prototypes K (default 65536)")
    parser.add_argument("--history", type=int, help="DTCH history_size in rows (default 40000)")
    parser.add_argument("--teacher-temp", type=float, default=0.07)
    parser.add_argument("--quick", action="store_true", help="small K and N, few repeats (tests/CI)")
    parser.add_argument("--json", type=Path, help="write machine-readable results here")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key in ("k", "sizes", "history", "repeats"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    args.copy_mb = defaults["copy_mb"]
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False")
    if args.repeats < 1 or args.k < 1 or args.history < 1 or min(args.sizes) < 1:
        parser.error("--repeats, --k, --history and --sizes must be >= 1")
    return args


def environment(device: torch.device) -> dict[str, object]:
    """Torch version, device name, threads and date of this run."""
    if device.type == "cuda":
        name = f"cuda: {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        name = f"cpu: {cpu_model()} ({os.cpu_count()} logical cores)"
    return {
        "torch": torch.__version__,
        "device": name,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def make_logit_sampler(k: int, device: torch.device, seed: int = 0):
    """A function n -> teacher-like logits [n, K] fp32 on ``device`` (see the module doc)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    prototypes = torch.randn(k, BOTTLENECK_DIM, device=device, generator=generator)
    prototypes = torch.nn.functional.normalize(prototypes, dim=1)  # W [K, D]
    noise_scale = 1.5 / BOTTLENECK_DIM**0.5  # |noise| ≈ 1.5, so z·w_own ≈ 1 / sqrt(1 + 1.5²)

    def draw(n: int) -> torch.Tensor:
        own = torch.randint(0, k, (n,), device=device, generator=generator)
        noise = torch.randn(n, BOTTLENECK_DIM, device=device, generator=generator)
        features = torch.nn.functional.normalize(prototypes[own] + noise_scale * noise, dim=1)
        return features @ prototypes.T  # Z [n, K], cosines

    return draw


def copy_bandwidth(device: torch.device, megabytes: int, repeats: int = 5) -> float:
    """Bytes read + written per second by ``dst.copy_(src)`` of fp32 tensors, best of ``repeats``."""
    source = torch.ones(megabytes * 2**20 // 4, device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # faults the pages of ``target`` in: not timed
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * 4 / best


def floor_bytes(n: int, k: int, dtch_capacity: int | None = None) -> int:
    """Bytes a call must move at least: logits read + probs written, plus DTCH's window push."""
    total = 2 * n * k * 4
    if dtch_capacity is not None:
        block_rows = window_block_rows(dtch_capacity)
        num_blocks = -(-dtch_capacity // block_rows)
        total += k * (block_rows * 4 + num_blocks * 8 + 4 + 8)
    return total


def call_method(name: str, assigners: dict[str, torch.nn.Module], logits: torch.Tensor, temp: float):
    """One assigner call; ``dtch`` and ``dtch_entropy`` share the DTCH instance (and its window)."""
    if name.startswith("dtch"):
        assigners["dtch"].collect_target_entropy = name == "dtch_entropy"
        return assigners["dtch"](logits, temp)
    return assigners[name](logits, temp)


def timed_call(name, assigners, logits, temp, device) -> tuple[float, float | None]:
    """(seconds, peak extra bytes allocated during the call on CUDA else None); output included."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    synchronize(device)
    start = time.perf_counter()
    probs = call_method(name, assigners, logits, temp)
    synchronize(device)
    elapsed = time.perf_counter() - start
    del probs
    peak = torch.cuda.max_memory_allocated(device) - baseline if device.type == "cuda" else None
    return elapsed, peak


def summarise(seconds: list[float]) -> dict[str, float]:
    """Median, quartiles and minimum of the samples, in milliseconds."""
    ms = sorted(s * 1e3 for s in seconds)
    q25, _, q75 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else ms * 3
    return {"median_ms": statistics.median(ms), "q25_ms": q25, "q75_ms": q75, "min_ms": ms[0]}


def bench_size(n: int, args: argparse.Namespace, draw, device: torch.device, bandwidth: float) -> dict:
    """All methods at N = n, interleaved: summaries, floor multiples and DTCH/Sinkhorn ratios."""
    temp = args.teacher_temp
    dtch = DTCH(args.k, args.history).to(device)
    dtch.collect_target_entropy = False
    assigners = {
        "softmax_centering": SoftmaxCentering(args.k).to(device),
        "sinkhorn_3": SinkhornKnopp(3),
        "dtch": dtch,
    }
    print(f"N={n}: filling the DTCH window ({max(1, args.history // n)} calls)", file=sys.stderr)
    while not dtch.history_full:
        dtch(draw(n), temp)
    for name in METHODS * WARMUP_CALLS:
        call_method(name, assigners, draw(n), temp)
    seconds = {name: [] for name in METHODS}
    peaks = {name: [] for name in METHODS}
    for repeat in range(args.repeats):
        shift = repeat % len(METHODS)
        for name in METHODS[shift:] + METHODS[:shift]:
            logits = draw(n)
            elapsed, peak = timed_call(name, assigners, logits, temp, device)
            del logits
            seconds[name].append(elapsed)
            peaks[name].append(peak)
    methods = {}
    for name in METHODS:
        stats = summarise(seconds[name])
        capacity = dtch.capacity if name.startswith("dtch") else None
        stats["floor_ms"] = floor_bytes(n, args.k, capacity) / bandwidth * 1e3
        stats["floor_multiple"] = stats["median_ms"] / stats["floor_ms"]
        stats["peak_extra_mb"] = max(peaks[name]) / 2**20 if peaks[name][0] is not None else None
        stats["samples_ms"] = [s * 1e3 for s in seconds[name]]
        methods[name] = stats

    def ratio(name: str) -> float:
        return statistics.median(a / b for a, b in zip(seconds[name], seconds["sinkhorn_3"]))

    return {
        "n": n,
        "k": args.k,
        "dtch_capacity": dtch.capacity,
        "floor_ms": floor_bytes(n, args.k) / bandwidth * 1e3,  # logits + probs only
        "methods": methods,
        "dtch_over_sinkhorn": ratio("dtch"),
        "dtch_entropy_over_sinkhorn": ratio("dtch_entropy"),
    }


def markdown(results: list[dict]) -> str:
    """The results as a markdown table, then the DTCH/Sinkhorn ratios."""
    lines = [
        "| N | K | method | median ms | IQR ms | min ms | floor ms | × floor | peak extra MB |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        for name, s in result["methods"].items():
            peak = "–" if s["peak_extra_mb"] is None else f"{s['peak_extra_mb']:.0f}"
            lines.append(
                f"| {result['n']} | {result['k']} | {name} | {s['median_ms']:.2f} | "
                f"{s['q25_ms']:.2f}–{s['q75_ms']:.2f} | {s['min_ms']:.2f} | "
                f"{s['floor_ms']:.2f} | {s['floor_multiple']:.1f} | {peak} |"
            )
    lines.append("")
    for result in results:
        lines.append(
            f"N={result['n']}: DTCH/Sinkhorn = {result['dtch_over_sinkhorn']:.2f} "
            f"(with target entropy: {result['dtch_entropy_over_sinkhorn']:.2f}; "
            f"DTCH window C = {result['dtch_capacity']})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the environment and the table, optionally write JSON."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = environment(device)
    bandwidth = copy_bandwidth(device, args.copy_mb)
    draw = make_logit_sampler(args.k, device)
    with torch.no_grad():
        results = [bench_size(n, args, draw, device, bandwidth) for n in args.sizes]
    settings = {key: getattr(args, key) for key in ("k", "sizes", "history", "repeats", "teacher_temp")}
    report = {
        "environment": env,
        "settings": settings | {"quick": args.quick},
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "results": results,
    }
    for key, value in env.items():
        print(f"- {key}: {value}")
    print(
        f"- copy bandwidth: {bandwidth / 1e9:.1f} GB/s (read + write); T = {args.teacher_temp}; "
        f"DTCH history = {args.history} rows; {args.repeats} repeats\n"
    )
    print(markdown(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
