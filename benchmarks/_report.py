"""Shared by the benchmarks: the machine description, device sync, memory readings, and the printed
report of ``bench_step.py`` (its JSON, as markdown)."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import resource
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (CUDA); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def git_revision() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True)
    except OSError:
        return "unknown"
    if head.returncode:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def current_rss_mb() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return math.nan
    return pages * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def environment(device: torch.device, threads: int, load_before: float) -> dict:
    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "threads": threads,
        "load_avg_1m_at_start": load_before,
        "git": git_revision(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
        env["cuda"] = torch.version.cuda
    return env


def print_report(result: dict) -> None:
    env, cfg, res = result["environment"], result["config"], result["timing"]
    print()
    print(f"torch {env['torch']} | python {env['python']} | {env['cpu']} | {env['threads']} threads")
    print(f"{env['date']} | git {env['git']}" + (f" | {env['gpu']}" if "gpu" in env else ""))
    load, cores = env["load_avg_1m_at_start"], env["cpu_cores"]
    if "gpu" not in env and load > 0.5 and load + env["threads"] > cores:
        print(
            f"warning: load average {load:.1f} on {cores} cores at the start: other processes compete"
            " for the cores, so these CPU timings are not representative"
        )
    print()
    print(
        "| variant | device | arch | K | B | crops | dtype | compile | AC | s/step (median) | min–max"
        " | img/s | peak mem | data s/batch |"
    )
    print("|" + "---|" * 14)
    memory = result["memory"]
    # one process: parameters stay fp32 and bf16/fp16 is an autocast (FSDP2 would cast the parameters)
    dtype = cfg["param_dtype"] + (" (autocast)" if cfg["autocast"] != "None" else "")
    mem = (
        f"{memory['cuda_max_allocated_mb']:.0f} MB alloc"
        if "cuda_max_allocated_mb" in memory
        else f"{memory['peak_rss_mb']:.0f} MB RSS"
    )
    print(
        f"| {result['label'] or '-'} | {cfg['device']} | {cfg['arch']} | {cfg['k']} | {cfg['batch']}"
        f" | {cfg['crops']} | {dtype} | {cfg['compile_applied']} | {cfg['activation_checkpointing']}"
        f" | {res['median_s']:.3f} (steps {res['median_of_steps']}) | {res['min_s']:.3f}–{res['max_s']:.3f}"
        f" | {res['images_per_s']:.2f} | {mem} | {result['data']['median_s_per_batch']:.3f} |"
    )
    print()
    print(
        f"untimed warm-up: first teacher call {result['dtch']['first_teacher_call_s']:.2f} s, "
        f"steps 1–{res['skip']} {res['warmup_s']:.2f} s (first step {res['first_step_s']:.2f} s)"
    )
    for name, window in result["dtch"].items():
        if isinstance(window, dict):
            print(
                f"dtch {name}: {window['rows_per_call']} rows/call, window {window['window_rows']} rows,"
                f" {window['fill_calls']} fill calls, per call {_ms(window['call_ms_early'])} early"
                f" vs {_ms(window['call_ms_full'])} full"
            )
    print(f"memory: {json.dumps(memory)}")
    if "profile" in result:
        prof = result["profile"]
        for key, table in prof["tables"].items():
            print(f"\ntop ops by {key} over {prof['steps']} steps:\n{table}")
        total = sum(v for k, v in prof["stages_s"].items() if not k.startswith("("))
        print(f"\n| stage (median of {prof['steps']} steps) | s | share |\n|---|---|---|")
        for stage, seconds in prof["stages_s"].items():
            print(f"| {stage} | {seconds:.3f} | {100 * seconds / total:.0f}% |")
        print(f"| sum | {total:.3f} | |")


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} ms"
