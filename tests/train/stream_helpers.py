"""Configs and gradient probes for the invariance-stream tests (tiny runs on the CPU)."""

from __future__ import annotations

from pathlib import Path

import torch

from dino_bridge.distributed.device import Runtime
from dino_bridge.train import build
from dino_bridge.train.feed import BatchFeed
from dino_bridge.train.loop import build_run, train_step
from dino_bridge.train.terms import StepPlan
from tests.helpers import tiny_config

STREAM_WEIGHTS = {
    "resize_paste_loss_weight": 0.5,
    "patch_shuffle_loss_weight": 1.0,
    "bridge_global_weight": 0.25,
    "bridge_patchshuffle_weight": 0.25,
}


def stream_overrides(weights: dict | None = None, *, gate: str = "null", extra=()) -> list[str]:
    """SSLResizeShuffle on the tiny config (16 px crops, patch 4: a 4×4 grid), constant weights."""
    weights = STREAM_WEIGHTS if weights is None else weights
    return [
        "MODEL.META_ARCHITECTURE=SSLResizeShuffle",
        "crops.use_resize_shuffle_augmentor=true",
        "resize_shuffle_augmentor.patch_size=4",
        f"resize_shuffle_augmentor.bridge_ibot_gate={gate}",
        *(f"resize_shuffle_augmentor.{k}={v}" for k, v in weights.items()),
        *extra,
    ]


def stream_config(images: Path, weights: dict | None = None, *, iterations=4, period=100, extra=()):
    return tiny_config(
        images, iterations=iterations, period=period, extra=stream_overrides(weights, extra=extra)
    )


def grads_with_and_without(run, batch: dict, iteration: int, dropped: tuple[str, ...]) -> tuple[dict, dict]:
    """Student gradients of one step's total, with every term and without the ``dropped`` ones,
    from the same state (same seed; teacher-target state restored in between)."""
    meta = run.meta
    full = meta.plan(iteration)
    kept = [t for t in meta.terms if t.name not in dropped]
    without = StepPlan.of(kept, iteration, tuple(meta.target_specs))
    temp = run.schedules.at(iteration)["teacher_temp"]
    result = []
    for plan in (full, without):
        snapshots = {name: a.snapshot() for name, a in meta.assigners.items()}
        torch.manual_seed(1234)
        ctx = meta.context(batch, plan, temp)
        meta.teacher_targets(ctx)
        meta.student_outputs(ctx)
        total, _, _ = meta.compute_losses(ctx)
        total.backward()
        grads = {}
        for name, param in run.student.named_parameters():
            if param.grad is not None:
                grad = param.grad
                grads[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).detach().clone()
        run.optimizer.zero_grad(set_to_none=True)
        for name, record in snapshots.items():
            meta.assigners[name].restore(record)
        result.append(grads)
    return result[0], result[1]


def bridge_gradient_probe(cfg, runtime: Runtime, output_dir: Path) -> dict:
    """Two real steps (the lr is 0 at the first: the bridge's last conv leaves zero at the second),
    then the gradients at the next step with and without the bridge terms:
    {part: (max |with − without|, max |with|, parameters with a gradient without the bridge terms)}."""
    run = build_run(cfg, runtime, output_dir)
    feed = BatchFeed(run, build.build_train_source(cfg), run.end_iter)
    feed.start(0)
    for it in range(2):
        train_step(run, build.move_batch(feed.next(it), runtime.device), it)
    batch = build.move_batch(feed.next(2), runtime.device)
    dropped = ("aug/bridge_global_loss", "aug/bridge_patchshuffle_loss")
    with_bridge, without = grads_with_and_without(run, batch, 2, dropped)
    out = {}
    for part in ("backbone", "dino_head", "ibot_head", "bridge"):
        names = [n for n in with_bridge if n.startswith(part + ".")]
        diff = max(
            (
                (with_bridge[n] - without[n]).abs().max().item()
                if n in without
                else with_bridge[n].abs().max().item()
            )
            for n in names
        )
        scale = max(with_bridge[n].abs().max().item() for n in names)
        out[part] = (diff, scale, sum(n in without for n in names))
    return out
