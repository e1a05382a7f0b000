"""Seconds per training step and peak memory of the real trainer, on synthetic images.

    python benchmarks/bench_step.py --dtype fp32               # the acceptance configuration
    python benchmarks/bench_step.py --dtype bf16 --profile     # + top ops and a per-stage breakdown
    python benchmarks/bench_step.py --quick --device cpu       # a seconds-long smoke run

Defaults: the seed YAML (configs/dinov3_vitlarge_pretrain.yaml) shrunk to vit_small, K = 4096
prototypes in both heads, B = 8, its crops as written (2×224 + 8×96), one process, 2 threads,
``optim.epochs=2`` (the seed's stream weights stay 0 over those iterations), ``--dtype`` = the
seed's ``compute_precision.param_dtype`` (bf16) unless given. ``--streams`` switches the seed's
invariance streams on from iteration 0 at their peak weights (Crop-Resize 0.5, PatchRoll 1 × (1, 1),
bridges 0.25 each), with ``--bridge-gate`` (default null: the bridges always on; the seed's 4.0
gates them off while the iBOT loss is above it, as it is at K = 4096 early in training).

The run is built as the trainer builds it (``load_config`` → ``setup_runtime`` → ``build_run``)
and the batches come from the real pipeline (``build_train_source`` + ``build_loader``, 0 workers).

What is timed: one step = what ``loop._loop`` does per iteration, in its order: batch to device,
per-step seed, schedules, assigner snapshots, teacher targets, student outputs and losses,
backward, gradient averaging (a no-op in one process), clipping, the non-finite check, optimizer
step, zero_grad, EMA; on CUDA the clock stops after a synchronize. Not timed: data loading (a
small pool of batches is pre-fetched and cycled; the per-batch data time is reported apart),
logging and checkpointing (every ``train.log_period`` / ``checkpointing.period`` steps). DTCH
targets skip the row entropy, as the loop does on the steps it does not log. The reported time is
the median of steps ``--skip``+1 … ``--steps`` (5–20 by default).

DTCH windows: the first teacher call fills a window with copies of its own column mass, so from
then on every call does the same work however many real pushes it has seen (one row written, one
block of ⌈√C⌉ rows re-summed). Filling the windows by teacher passes (the trainer's warm-up) would
take C = 40000 // N teacher forwards — 2500 at B = 8 — so this script makes one real teacher call,
then feeds each assigner the logits it received until ``history_full`` (``--dtch-fill none``
stops after that one call). The fill times the assigner calls early (a window of copies) and late
(a full window), so the claim that the cost does not depend on it is checked on every run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks._report import (  # noqa: E402
    current_rss_mb,
    environment,
    peak_rss_mb,
    print_report,
    synchronize,
)
from benchmarks._synthetic import write_synthetic_images  # noqa: E402
from dino_bridge.config import load_config  # noqa: E402
from dino_bridge.data.invariance import data_kinds_for  # noqa: E402
from dino_bridge.distributed.device import setup_runtime  # noqa: E402
from dino_bridge.train import build  # noqa: E402
from dino_bridge.train.loop import TrainingRun, build_run, teacher_targets, train_step  # noqa: E402
from dino_bridge.train.metrics import setup_logging  # noqa: E402

SEED_YAML = REPO / "configs" / "dinov3_vitlarge_pretrain.yaml"
EXIT_OOM = 3
QUICK = dict(arch="vit_tiny", k=256, batch=4, steps=3, skip=1, images=16, image_size=48)
QUICK_OVERRIDES = [
    "student.patch_size=8",
    "resize_shuffle_augmentor.patch_size=8",
    "crops.global_crops_size=32",
    "crops.local_crops_size=16",
    "dino.head_hidden_dim=64",
    "dino.head_bottleneck_dim=32",
    "ibot.head_hidden_dim=64",
    "ibot.head_bottleneck_dim=32",
]


# ----------------------------------------------------------------------------------------- setup
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Seconds per training step and peak memory of the real trainer (see the module doc).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", default=str(SEED_YAML), help="the YAML to shrink")
    p.add_argument("--arch", default="vit_small", help="student.arch")
    p.add_argument("--k", type=int, default=4096, help="prototypes of both heads")
    p.add_argument("--batch", type=int, default=8, help="train.batch_size_per_gpu")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="param_dtype (default: the YAML's)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--skip", type=int, default=4, help="first steps left out of the median")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="train.compile (default: YAML)")
    p.add_argument("--ac", action=argparse.BooleanOptionalAction, help="train.checkpointing (default: YAML)")
    p.add_argument("--profile", action="store_true", help="top ops and a per-stage breakdown")
    p.add_argument("--profile-steps", type=int, default=3, help="steps profiled (after the timed ones)")
    p.add_argument("--pool", type=int, default=4, help="distinct pre-fetched batches, cycled")
    p.add_argument("--data", help="txt list of images (default: synthetic images in a temp dir)")
    p.add_argument("--images", type=int, default=256, help="synthetic images")
    p.add_argument("--image-size", type=int, default=256, help="synthetic image side")
    p.add_argument("--dtch-fill", choices=("assigner", "none"), default="assigner", help="see module doc")
    p.add_argument("--quick", action="store_true", help="vit_tiny, 32 px crops, 3 steps (a smoke run)")
    p.add_argument("--streams", action="store_true", help="the invariance streams on from iteration 0")
    p.add_argument("--bridge-gate", default="null", help="resize_shuffle_augmentor.bridge_ibot_gate")
    p.add_argument("--label", default="", help="a name for this variant in the outputs")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--overrides", nargs="*", default=[], help="key=value config overrides (applied last)")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    if not 0 <= args.skip < args.steps:
        p.error(f"need 0 <= --skip < --steps, got --skip {args.skip} --steps {args.steps}")
    if args.pool < 1 or args.threads < 1:
        p.error("--pool and --threads must be >= 1")
    return args


def config_overrides(args: argparse.Namespace, data_names: list[str], txt_path: Path | str) -> list[str]:
    overrides = [
        f"student.arch={args.arch}",
        f"dino.head_n_prototypes={args.k}",
        f"ibot.head_n_prototypes={args.k}",
        f"train.batch_size_per_gpu={args.batch}",
        "train.num_workers=0",
        "optim.epochs=2",
    ]
    overrides += QUICK_OVERRIDES if args.quick else []
    overrides += [f"compute_precision.param_dtype={args.dtype}"] if args.dtype else []
    overrides += [f"train.compile={args.compile}"] if args.compile is not None else []
    overrides += [f"train.checkpointing={args.ac}"] if args.ac is not None else []
    for name in data_names:
        overrides += [f"data.{name}.txt_path={txt_path}", f"data.{name}.dataset_ratio=1.0"]
    if args.streams:
        for name in STREAM_SCHEDULES:
            overrides += [f"{name}.zero_epochs=0", f"{name}.warmup_epochs=0"]
        overrides += [f"resize_shuffle_augmentor.bridge_ibot_gate={args.bridge_gate}"]
    return overrides + list(args.overrides)


STREAM_SCHEDULES = [
    f"resize_shuffle_augmentor.{name}"
    for name in (
        "resize_paste_loss_weight",
        "patch_shuffle_loss_weight",
        "bridge_global_weight",
        "bridge_patchshuffle_weight",
    )
]


# ------------------------------------------------------------------------------------------- data
def prefetch_batches(run: TrainingRun, pool: int) -> tuple[list[dict], list[float]]:
    """``pool`` batches from the real pipeline (kept on the host, as the loader yields them)."""
    cfg, runtime = run.cfg, run.runtime
    source = build.build_train_source(cfg)
    plan = run.meta.plan(0)
    loader = build.build_loader(
        cfg,
        source,
        rank=0,
        world_size=1,
        start_position=0,
        pin_memory=runtime.device.type == "cuda",
        invariance_kinds=data_kinds_for((*plan.teacher_views, *plan.student_views)),
    )
    batches, seconds = [], []
    iterator = iter(loader)
    for _ in range(pool):
        t0 = time.perf_counter()
        batches.append(next(iterator))
        seconds.append(time.perf_counter() - t0)
    return batches, seconds


# ------------------------------------------------------------------------------------------- DTCH
def _dtch_windows(run: TrainingRun, iteration: int = 0) -> dict:
    """The DTCH instances that the step at ``iteration`` calls."""
    called = {name: run.meta.assigners[name] for name in run.meta.plan(iteration).assigners}
    return {name: a for name, a in called.items() if hasattr(a, "history_full")}


def fill_dtch_windows(run: TrainingRun, batch: dict, mode: str) -> dict:
    """One real teacher call, then (``mode="assigner"``) its logits again until every window is full."""
    windows = _dtch_windows(run)
    for assigner in windows.values():
        assigner.collect_target_entropy = False
    captured: dict[str, tuple] = {}

    def keep_inputs(name: str):
        def hook(_module, inputs) -> None:
            captured.setdefault(name, inputs)

        return hook

    hooks = [a.register_forward_pre_hook(keep_inputs(name)) for name, a in windows.items()]
    device = run.runtime.device
    t0 = time.perf_counter()
    ctx = run.meta.context(
        build.move_batch(batch, device), run.meta.plan(0), run.schedules.at(0)["teacher_temp"]
    )
    teacher_targets(run, ctx)
    synchronize(device)
    report: dict = {"mode": mode, "first_teacher_call_s": time.perf_counter() - t0}
    for hook in hooks:
        hook.remove()
    for name, assigner in windows.items():
        logits, temperature = captured[name]
        call_ms = []
        while mode == "assigner" and not assigner.history_full:
            t0 = time.perf_counter()
            assigner(logits, temperature)
            synchronize(device)
            call_ms.append(1e3 * (time.perf_counter() - t0))
        early, late = call_ms[:10], call_ms[-10:]
        report[name] = {
            "rows_per_call": int(logits.shape[0]),
            "window_rows": assigner.capacity,
            "fill_calls": len(call_ms),
            "history_full": assigner.history_full,
            "call_ms_early": statistics.median(early) if early else None,
            "call_ms_full": statistics.median(late) if late else None,
        }
    return report


# ------------------------------------------------------------------------------------------- step
class StageClock:
    """perf_counter laps between named stages (synchronising on CUDA); disabled, it does nothing."""

    def __init__(self, device: torch.device, enabled: bool):
        self.device, self.enabled = device, enabled
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self._last = 0.0

    def start(self) -> None:
        if self.enabled:
            synchronize(self.device)
            self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.enabled:
            synchronize(self.device)
            now = time.perf_counter()
            self.seconds[stage].append(now - self._last)
            self._last = now


def training_step(run: TrainingRun, host_batch: dict, it: int, clock: StageClock) -> None:
    """One iteration of the loop (``loop.train_step``) without its logging and checkpointing."""
    clock.start()
    batch = build.move_batch(host_batch, run.runtime.device)
    clock.lap("batch to device")
    if train_step(run, batch, it, stage=clock.lap).skipped:
        print(f"warning: step {it} was not finite and skipped, as the loop would", file=sys.stderr)


class AssignerTimer:
    """Forward hooks that time the DTCH calls inside the teacher stage (for the breakdown)."""

    def __init__(self, run: TrainingRun):
        self.device, self.seconds, self._t0 = run.runtime.device, [], 0.0
        self.hooks = []
        for assigner in run.meta.assigners.values():
            self.hooks.append(assigner.register_forward_pre_hook(self._start))
            self.hooks.append(assigner.register_forward_hook(self._stop))

    def _start(self, *_):
        synchronize(self.device)
        self._t0 = time.perf_counter()

    def _stop(self, *_):
        synchronize(self.device)
        self.seconds.append(time.perf_counter() - self._t0)

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


# ---------------------------------------------------------------------------------------- profile
def profile_steps(run: TrainingRun, batches: list, first_it: int, count: int) -> dict:
    """torch.profiler over ``count`` steps, then ``count`` steps with a clock around each stage."""
    from torch.profiler import ProfilerActivity, profile

    device = run.runtime.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    off = StageClock(device, enabled=False)
    with profile(activities=activities) as prof:
        for i in range(count):
            training_step(run, batches[(first_it + i) % len(batches)], first_it + i, off)
        synchronize(device)
    averages = prof.key_averages()
    sort_keys = ["self_cpu_time_total"] + (["self_device_time_total"] if device.type == "cuda" else [])
    tables, top = {}, {}
    for key in sort_keys:
        tables[key] = averages.table(sort_by=key, row_limit=15)
        rows = sorted(averages, key=lambda e, key=key: getattr(e, key, 0.0), reverse=True)[:15]
        total_key = "cpu_time_total" if key.startswith("self_cpu") else "device_time_total"
        top[key] = [
            {
                "name": e.key,
                "calls_per_step": e.count / count,
                "self_ms_per_step": getattr(e, key, 0.0) / 1e3 / count,
                "total_ms_per_step": getattr(e, total_key, 0.0) / 1e3 / count,
            }
            for e in rows
        ]

    clock, assign = StageClock(device, enabled=True), AssignerTimer(run)
    start = first_it + count
    try:
        for i in range(count):
            training_step(run, batches[(start + i) % len(batches)], start + i, clock)
    finally:
        assign.remove()
    stages = {name: statistics.median(values) for name, values in clock.seconds.items()}
    stages["(of the teacher stage: assigner calls)"] = sum(assign.seconds) / count
    return {"steps": count, "tables": tables, "top_ops": top, "stages_s": stages}


# ------------------------------------------------------------------------------------------ main
def shown_path(path: str | Path) -> str:
    """A path as it goes into the results: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def run_benchmark(args: argparse.Namespace, workdir: Path) -> dict:
    load_before = os.getloadavg()[0]
    txt_path = (
        Path(args.data)
        if args.data
        else write_synthetic_images(workdir / "images", args.images, args.image_size)
    )
    seed_cfg = load_config(args.config)
    cfg = load_config(args.config, config_overrides(args, list(seed_cfg.data.keys()), txt_path))
    problems = build.config_problems(cfg)
    if problems:
        raise SystemExit("this config cannot run yet:\n  - " + "\n  - ".join(map(str, problems)))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    runtime = setup_runtime(args.device)
    if runtime.world_size != 1:
        raise SystemExit("bench_step.py measures one process; run it without torchrun")
    device = runtime.device

    t0 = time.perf_counter()
    run = build_run(cfg, runtime, workdir / "run")
    build_s = time.perf_counter() - t0
    if args.steps + 2 * args.profile_steps * args.profile > run.total_iters:
        raise SystemExit(f"more steps than the schedules hold ({run.total_iters}); raise optim.epochs")
    batches, data_s = prefetch_batches(run, args.pool)
    dtch = fill_dtch_windows(run, batches[0], args.dtch_fill)

    rss_before = current_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    off = StageClock(device, enabled=False)
    step_s = []
    for it in range(args.steps):
        t0 = time.perf_counter()
        training_step(run, batches[it % len(batches)], it, off)
        synchronize(device)
        step_s.append(time.perf_counter() - t0)
        print(f"step {it + 1}/{args.steps}: {step_s[-1]:.3f} s", file=sys.stderr, flush=True)
    memory = {"peak_rss_mb": peak_rss_mb(), "rss_before_steps_mb": rss_before}
    if device.type == "cuda":
        memory["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        memory["cuda_max_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20

    timed = step_s[args.skip :]
    median = statistics.median(timed)
    batch, crops = batches[0], cfg.crops
    result = {
        "label": args.label,
        "status": "ok",
        "environment": environment(device, torch.get_num_threads(), load_before),
        "config": {
            "yaml": shown_path(args.config),
            "device": str(device),
            "arch": str(cfg.student.arch),
            "k": int(cfg.dino.head_n_prototypes),
            "k_ibot": int(cfg.ibot.head_n_prototypes),
            "batch": int(cfg.train.batch_size_per_gpu),
            "crops": f"2×{crops.global_crops_size} + {crops.local_crops_number}×{crops.local_crops_size}",
            "param_dtype": run.plan.param_dtype,
            "autocast": str(run.autocast_dtype),
            "compile_requested": run.plan.compile,
            "compile_applied": run.plan.compile and device.type == "cuda",
            "activation_checkpointing": run.plan.activation_checkpointing,
            "teacher_targets": build.assigner_kind(cfg),
            "terms": list(run.meta.plan(0).names),
            "bridge_ibot_gate": cfg.resize_shuffle_augmentor.bridge_ibot_gate if args.streams else None,
            "parameters_trained": sum(p.numel() for p in run.student.parameters()),
            "masked_patches_per_batch": batch["masks"]["global"].count,
            "overrides": config_overrides(
                args, list(seed_cfg.data.keys()), shown_path(txt_path) if args.data else "<synthetic images>"
            ),
        },
        "timing": {
            "steps": args.steps,
            "skip": args.skip,
            "median_of_steps": f"{args.skip + 1}–{args.steps}",
            "median_s": median,
            "min_s": min(timed),
            "max_s": max(timed),
            "images_per_s": int(cfg.train.batch_size_per_gpu) / median,
            "first_step_s": step_s[0],
            "warmup_s": sum(step_s[: args.skip]),
            "step_s": step_s,
            "build_s": build_s,
        },
        "data": {
            "pool": args.pool,
            "s_per_batch": data_s,
            "median_s_per_batch": statistics.median(data_s[1:] or data_s),
            "note": "the first batch includes the loader's start-up",
        },
        "dtch": dtch,
        "memory": memory,
    }
    if args.profile:
        try:
            result["profile"] = profile_steps(run, batches, args.steps, args.profile_steps)
        except Exception as error:  # the timings above stand on their own
            result["profile_error"] = f"{type(error).__name__}: {error}"
            print(f"profile failed: {result['profile_error']}", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    setup_logging(None, is_main=True)
    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        try:
            result = run_benchmark(args, Path(tmp))
        except torch.OutOfMemoryError as error:
            message = str(error).splitlines()[0]
            print(f"out of memory: {message}", file=sys.stderr)
            if args.json:
                Path(args.json).write_text(
                    json.dumps({"label": args.label, "status": "oom", "error": message}, indent=2) + "\n"
                )
            return EXIT_OOM
    print_report(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
