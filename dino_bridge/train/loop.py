"""The training loop. One iteration reads top to bottom:

    batch → teacher targets → student outputs → losses → backward → gradient sync → clip
          → (skip if non-finite on any rank) → step → EMA → (online kNN) → log → checkpoint

Every random draw of iteration ``it`` on rank ``r`` comes from generators seeded with
(seed, r, it) — the data pipeline's from (seed, r, stream position) — so a resumed run repeats an
uninterrupted one exactly, with no RNG stream to save.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from ..config import ConfigError
from ..config.features import end_iteration, superseded_notes
from ..distributed import dist
from ..distributed.data_parallel import average_gradients_, broadcast_parameters_
from ..distributed.device import Runtime
from ..distributed.parallelize import DTYPES, ParallelPlan, build_mesh, parallelize
from ..export.hf import is_hf_checkpoint, load_hf_backbone_
from ..seeding import derive_seed
from . import build
from .checkpoint import (
    checkpoint_root,
    load_backbone_weights_,
    prune_checkpoints,
    resume_checkpoint,
    save_checkpoint,
)
from .ema import copy_student_to_teacher_, ema_update_
from .feed import BatchFeed
from .meta_arch import SSLMetaArch
from .metrics import MetricsFile, StepTimer, format_record, peak_memory_mb, progress_bar, setup_logging
from .online_eval import build_online_knn
from .optim import apply_schedules
from .run_dir import RunDir
from .signals import GracefulStop

logger = logging.getLogger("dino_bridge")


class NonFiniteLossError(RuntimeError):
    """Training stopped after too many consecutive non-finite steps."""


@dataclass
class TrainingRun:
    """Everything the loop works on, built once."""

    cfg: DictConfig
    runtime: Runtime
    output_dir: Path
    meta: SSLMetaArch
    optimizer: torch.optim.Optimizer
    schedules: build.TrainingSchedules
    total_iters: int  # the schedules' length
    end_iter: int  # where this run stops (train.stop_at_iteration, or total_iters)
    plan: ParallelPlan

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """Mixed precision by autocast on the data-parallel path (FSDP2 casts parameters itself)."""
        if self.plan.fsdp or self.plan.param_dtype == "fp32":
            return None
        return DTYPES[self.plan.param_dtype]

    @property
    def student(self) -> nn.ModuleDict:
        return self.meta.student

    @property
    def teacher(self) -> nn.ModuleDict:
        return self.meta.teacher


def build_run(cfg: DictConfig, runtime: Runtime, output_dir: Path) -> TrainingRun:
    """Build on meta → transforms (AC, compile, FSDP2) → to_empty → init → teacher = student."""
    device = runtime.device
    plan = build.parallel_plan(cfg, runtime.world_size, device)
    logger.info("parallelism: %s", plan.describe())
    with torch.device("meta"):
        student = build.build_model_parts(cfg, student=True)
        teacher = build.build_model_parts(cfg, student=False)
    mesh = build_mesh(device, runtime.world_size) if plan.fsdp else None
    parallelize(student, plan, device, trains=True, mesh=mesh)
    parallelize(teacher, plan, device, trains=False, mesh=mesh)
    student.to_empty(device=device)
    teacher.to_empty(device=device)
    build.init_model_parts_(student, int(cfg.train.seed))
    copy_student_to_teacher_(teacher, student)
    streams = build.build_streams(cfg)
    meta = SSLMetaArch(student, teacher, streams, build.build_assigners(cfg, streams))
    meta.assigners.to(device)
    return TrainingRun(
        cfg=cfg,
        runtime=runtime,
        output_dir=output_dir,
        meta=meta,
        optimizer=build.build_student_optimizer(cfg, student, device),
        schedules=build.build_schedules(cfg, runtime.world_size),
        total_iters=build.total_iterations(cfg),
        end_iter=end_iteration(cfg),
        plan=plan,
    )


def _autocast(run: TrainingRun):
    if run.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=run.runtime.device.type, dtype=run.autocast_dtype)


def _log_notes(cfg: DictConfig) -> None:
    for note in superseded_notes(cfg):
        logger.info(note)


# ------------------------------------------------------------------------------ the stages
def teacher_targets(run: TrainingRun, ctx) -> None:
    with _autocast(run):
        run.meta.teacher_targets(ctx)


def clip_gradients(run: TrainingRun) -> dict[str, float]:
    """Per-part gradient clipping (each part at optim.clip_grad); returns the pre-clip norms."""
    max_norm = float(run.cfg.optim.clip_grad)
    norms = {}
    for name, module in run.student.items():
        params = [p for p in module.parameters() if p.grad is not None]
        if not params:
            continue
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        norms[f"{name}_grad_norm"] = float(norm)
    return norms


@dataclass
class StepResult:
    total: torch.Tensor  # detached
    terms: dict[str, torch.Tensor]  # unweighted loss terms that ran (detached)
    weights: dict[str, float]  # every declared term's weight in the total (0: off or gated)
    metrics: dict[str, torch.Tensor]  # other scalars of the step (e.g. aligned PatchRoll tokens)
    grad_norms: dict[str, float]  # per part, before clipping
    schedule: dict[str, float]  # lr, last_layer_lr, wd, mom, teacher_temp of this iteration
    skipped: bool  # non-finite on some rank: no update happened


def _no_stage(name: str) -> None:
    return None


def _collect_entropy(run: TrainingRun, enabled: bool) -> None:
    for assigner in run.meta.assigners.values():
        if hasattr(assigner, "collect_target_entropy"):
            assigner.collect_target_entropy = enabled


def train_step(
    run: TrainingRun, batch: dict, it: int, *, log_diagnostics: bool = False, stage=_no_stage
) -> StepResult:
    """One iteration on a batch already on the device; ``stage(name)`` is called after each stage
    (the benchmark times them). Collective: every rank calls it with its own batch."""
    torch.manual_seed(derive_seed(int(run.cfg.train.seed), run.runtime.rank, "step", it))
    sched = run.schedules.at(it)
    apply_schedules(run.optimizer, sched["lr"], sched["last_layer_lr"], sched["wd"])
    plan = run.meta.plan(it)
    snapshots = {name: run.meta.assigners[name].snapshot() for name in plan.assigners}
    _collect_entropy(run, log_diagnostics)
    ctx = run.meta.context(batch, plan, sched["teacher_temp"])
    stage("prepare")
    teacher_targets(run, ctx)
    stage("teacher forward + targets")
    with _autocast(run):
        run.meta.student_outputs(ctx)
        stage("student forward")
        total, terms, weights = run.meta.compute_losses(ctx)
    stage("losses")
    total.backward()
    stage("backward")
    if not run.plan.fsdp:
        average_gradients_(p for p in run.student.parameters() if p.requires_grad)
    grad_norms = clip_gradients(run)
    finite = math.isfinite(total.item()) and all(math.isfinite(v) for v in grad_norms.values())
    skipped = dist.any_rank(not finite, run.runtime.device)
    stage("gradient sync + clip")
    if skipped:  # leave no trace: no update, teacher-target state as before the step
        for name, record in snapshots.items():
            run.meta.assigners[name].restore(record)
        run.optimizer.zero_grad(set_to_none=True)
    else:
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        stage("optimizer step")
        ema_update_(run.teacher, run.student, sched["mom"])
        stage("EMA")
    terms = {k: v.detach() for k, v in terms.items()}
    return StepResult(total.detach(), terms, weights, ctx.metrics, grad_norms, sched, skipped)


def warmup_history(run: TrainingRun, feed: BatchFeed, start_iteration: int) -> int:
    """Fill the DTCH windows that the first step calls with no-grad teacher passes (that step's
    plan: other assigners start empty when their stream switches on); returns the batches used."""
    plan = run.meta.plan(start_iteration)
    called = {name: run.meta.assigners[name] for name in plan.assigners}
    windows = {name: a for name, a in called.items() if hasattr(a, "history_full")}
    if not windows:
        return 0
    temperature = run.schedules.at(start_iteration)["teacher_temp"]
    _collect_entropy(run, False)  # nothing is logged during the warm-up
    used, bar = 0, None
    while not (used and all(a.history_full for a in windows.values())):
        batch = build.move_batch(feed.next(), run.runtime.device)
        teacher_targets(run, run.meta.context(batch, plan, temperature))
        used += 1
        if used == 1:
            sizes = ", ".join(f"{name}: {a.capacity}" for name, a in windows.items())
            logger.info("dtch: filling the history windows with teacher passes (window steps: %s)", sizes)
            total = max(a.capacity for a in windows.values())
            bar = progress_bar(total, 0, run.runtime.is_main)
        bar.update(1)
    bar.close()
    logger.info("dtch: history windows filled with %d batches (counted by the sampler)", used)
    return used


def _reduced_record(run: TrainingRun, it: int, step: StepResult, extra: dict) -> dict:
    """Terms, total and step metrics averaged over ranks (every rank has the same keys: what runs
    depends on the iteration only), plus every declared term's weight by the naming rule."""
    device = run.runtime.device
    names = [*step.terms, "total_loss", *step.metrics]
    values = [*step.terms.values(), step.total, *step.metrics.values()]
    stacked = torch.stack([v.detach().float().to(device).reshape(()) for v in values])
    dist.all_reduce_(stacked, op="mean")
    record = {"iteration": it, **dict(zip(names, stacked.tolist()))}
    for name, weight in step.weights.items():
        record[f"{name}_weight"] = weight
    record.update(extra)
    return record


# ------------------------------------------------------------------------------ the loop
def train(
    cfg: DictConfig,
    runtime: Runtime,
    output_dir: str | Path,
    checkpoint_dir: str | None = None,
    resume: bool = True,
) -> dict:
    """Train from ``cfg``; returns a summary (last record, checkpoint path)."""
    output_dir = Path(output_dir)
    build.check_config(cfg)
    layout = RunDir.prepare(output_dir, checkpoint_dir, resume)  # before train.log is opened
    setup_logging(output_dir, runtime.is_main, runtime.rank)
    logger.info("device: %s", runtime.describe())
    if runtime.note:
        logger.info(runtime.note)

    run_start = layout.resume_point(cfg)  # an incompatible config stops here, nothing written
    _log_notes(cfg)
    cfg.train.output_dir = str(output_dir)
    layout.save_config(cfg)

    run = build_run(cfg, runtime, output_dir)
    kind = build.assigner_kind(cfg)
    logger.info("teacher targets: %s for the DINO CLS and the iBOT patch targets", kind)
    start_iter, warmup_batches = 0, 0
    if run_start is not None:
        logger.info("resuming from %s", run_start)
        run_start, state = resume_checkpoint(
            run_start,
            student=run.student,
            teacher=run.teacher,
            optimizer=run.optimizer,
            fallback=layout.owns_start,
        )
        start_iter, warmup_batches = int(state["iteration"]), int(state["warmup_batches"])
        _load_assigners(run, state["assigners"])
        if state["world_size"] != runtime.world_size:
            logger.warning(
                "resuming a checkpoint written by %d processes on %d: models, optimizer and teacher-target"
                " state carry over, the data order differs from an uninterrupted run",
                state["world_size"],
                runtime.world_size,
            )
    if start_iter >= run.end_iter:
        logger.info(
            "already at iteration %d (this run ends at %d): nothing to train", start_iter, run.end_iter
        )
    else:
        _initialise_from_pretrained(run)
        if runtime.world_size > 1 and not run.plan.fsdp:
            broadcast_parameters_(run.meta.student)  # equal already (seeded init); guards against drift
            broadcast_parameters_(run.meta.teacher)

    feed = BatchFeed(run, build.build_train_source(cfg), run.end_iter)
    feed.warmup_batches = warmup_batches
    feed.start(start_iter)
    if run_start is None and kind == "dtch" and cfg.dtch.warmup_history:
        warmup_batches = feed.warmup_batches = warmup_history(run, feed, start_iter)

    summary = _loop(run, feed, start_iter, warmup_batches)
    summary["param_checksums"] = _gather_checksums(run)
    if len(set(summary["param_checksums"])) > 1:
        logger.error("the ranks' parameters differ at the end: %s", summary["param_checksums"])
    if runtime.is_main:
        (output_dir / "run_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    # No rank tears its process group down while another still uses it: under load, a gloo rank
    # that exited while rank 0 was still writing occasionally aborted at exit (SIGABRT).
    dist.barrier()
    return summary


def _load_assigners(run: TrainingRun, states: dict) -> None:
    """Restore each assigner's state; one without a state in the checkpoint (written before its
    stream existed or was on) starts empty, with one log line."""
    for name, assigner in run.meta.assigners.items():
        if name in states:
            assigner.load_state_dict(states[name])
        else:
            logger.info("teacher targets %s: no state in the checkpoint, starting empty", name)


def _initialise_from_pretrained(run: TrainingRun) -> None:
    """student.pretrained_weights / resume_from_teacher_chkpt: the backbone starts from those
    weights (the heads from their seeded init) and the teacher copies the student."""
    student_cfg = run.cfg.student
    given = [k for k in ("pretrained_weights", "resume_from_teacher_chkpt") if student_cfg[k]]
    if not given:
        return
    if len(given) > 1:
        raise ConfigError("set only one of student.pretrained_weights and student.resume_from_teacher_chkpt")
    try:
        path, backbone = student_cfg[given[0]], run.student["backbone"]
        if is_hf_checkpoint(path):  # Hugging Face DINOv3 weights (e.g. Meta's release)
            source = load_hf_backbone_(backbone, path, build.backbone_spec(run.cfg))
        else:
            source = load_backbone_weights_(backbone, path)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"student.{given[0]}: {e}") from None
    copy_student_to_teacher_(run.teacher, run.student)
    logger.info("student and teacher backbones initialised from %s (student.%s)", source, given[0])


def parameter_checksum(module: nn.Module) -> str:
    """SHA-256 of every parameter's full value (collective when parameters are sharded)."""
    digest = hashlib.sha256()
    for name, param in module.named_parameters():
        value = param.detach()
        value = value.full_tensor() if hasattr(value, "full_tensor") else value
        digest.update(name.encode())
        digest.update(value.float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _gather_checksums(run: TrainingRun) -> list[str]:
    """Each rank's checksum of the student and teacher parameters (identical when in sync)."""
    return dist.all_gather_object(parameter_checksum(run.student) + parameter_checksum(run.teacher))


def _loop(run: TrainingRun, feed: BatchFeed, start_iter: int, warmup_batches: int) -> dict:
    cfg, runtime = run.cfg, run.runtime
    log_period, period = max(1, int(cfg.train.log_period)), int(cfg.checkpointing.period)
    metrics = MetricsFile(run.output_dir / "metrics.jsonl", start_iter, enabled=runtime.is_main)
    timer, bar = StepTimer(), progress_bar(run.end_iter, start_iter, runtime.is_main)
    skipped = SkippedImages(runtime.device)
    knn, shown_knn = build_online_knn(cfg, runtime.device), {}
    streak, record, last_ckpt, stopped_at = 0, {}, None, None
    with GracefulStop() as stop:
        for it in range(start_iter, run.end_iter):
            t0 = time.perf_counter()
            batch = feed.next(it)
            timer.add_data_wait(time.perf_counter() - t0)
            skipped.note(batch.get("skipped", []))
            evaluates = knn.due(it)  # collective: every rank at the same iterations
            logs_now = (it + 1) % log_period == 0 or it + 1 == run.end_iter or it == start_iter or evaluates
            step = train_step(run, build.move_batch(batch, runtime.device), it, log_diagnostics=logs_now)
            streak = streak + 1 if step.skipped else 0
            if step.skipped:
                _warn_skipped_step(run, it, step, streak, last_ckpt)
            figures = knn(run.teacher["backbone"], it, lambda: _autocast(run)) if evaluates else {}
            timer.exclude(figures.get("knn/seconds", 0.0))  # not part of the step's throughput
            timer.steps += 1
            bar.update(1)
            if logs_now:
                record = _log_record(run, it, step, timer, skipped.total(), figures)
                metrics.write(record)
                logger.info(format_record(record))
                shown_knn.update({"knn": f"{figures['knn/top1']:.1f}%"} if "knn/top1" in figures else {})
                bar.set_postfix(
                    loss=f"{record['total_loss']:.3f}",
                    data=f"{100 * record['data_wait_share']:.0f}%",
                    **shown_knn,
                )
                timer.reset()
            if dist.any_rank(stop.requested, runtime.device):  # every rank stops at the same iteration
                last_ckpt, stopped_at = _save(run, it + 1, warmup_batches), it + 1
                logger.warning("stopped at iteration %d; the same command resumes from %s", it + 1, last_ckpt)
                break
            if (it + 1) % period == 0 or it + 1 == run.end_iter:
                last_ckpt = _save(run, it + 1, warmup_batches)
    bar.close()
    skipped.summarise()
    return {
        "last_record": record,
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "skipped": sorted(skipped.names),
        "stopped_at": stopped_at,
        "stopped_by": stop.signum if stopped_at is not None else None,  # the exit code: 128 + it
    }


class SkippedImages:
    """Unreadable files reported by the data pipeline: one warning per file, a global count."""

    def __init__(self, device: torch.device):
        self.names: set[str] = set()
        self.count = torch.zeros(1, dtype=torch.long, device=device)

    def note(self, names: list[str]) -> None:
        for name in names:
            if name not in self.names:
                self.names.add(name)
                logger.warning("skipped an unreadable image: %s", name)
        self.count += len(names)

    def total(self) -> int:
        """Images skipped so far on all ranks (collective)."""
        return int(dist.all_reduce(self.count, op="sum").item())

    def summarise(self) -> None:
        if self.names:
            names = ", ".join(sorted(self.names))
            logger.warning("%d unreadable image(s) were skipped and replaced: %s", len(self.names), names)


def _warn_skipped_step(run: TrainingRun, it: int, step: StepResult, streak: int, last_ckpt) -> None:
    values = ", ".join(f"{k}={v.item():.4g}" for k, v in step.terms.items())
    logger.warning("iteration %d: non-finite loss or gradient on some rank, step skipped (%s)", it, values)
    if streak >= int(run.cfg.train.max_nonfinite_steps):
        raise NonFiniteLossError(
            f"training stopped at iteration {it}: {streak} consecutive non-finite steps"
            f" (total_loss={step.total.item():.4g}; {values}); last checkpoint: {last_ckpt or 'none'}"
        )


def _log_record(
    run: TrainingRun, it: int, step: StepResult, timer: StepTimer, skipped_images: int, figures: dict
) -> dict:
    """One metrics.jsonl record: losses averaged over ranks, weights, schedules, norms, throughput,
    and the online evaluation's ``figures`` when it ran at this iteration (the same on every rank)."""
    sec_per_step, data_share, _ = timer.summary()
    images_per_step = int(run.cfg.train.batch_size_per_gpu) * run.runtime.world_size
    extra = {
        **step.schedule,
        **step.grad_norms,
        "images_per_sec": images_per_step / sec_per_step,
        "data_wait_share": data_share,
        "max_mem_mb": peak_memory_mb(run.runtime.device),
        "skipped_images": skipped_images,
        "skipped_step": step.skipped,
    }
    kind = build.assigner_kind(run.cfg)
    for name in run.meta.plan(it).assigners:  # the instances this step called
        for key, value in run.meta.assigners[name].diagnostics().items():
            extra[f"{kind}/{name}/{key}"] = value
    extra.update(figures)
    return _reduced_record(run, it, step, extra)


def _save(run: TrainingRun, iteration: int, warmup_batches: int) -> Path:
    cfg = run.cfg
    trainer_state = {
        "iteration": iteration,
        "warmup_batches": warmup_batches,
        "samples_consumed_per_rank": (iteration + warmup_batches) * int(cfg.train.batch_size_per_gpu),
        "world_size": run.runtime.world_size,
        "seed": int(cfg.train.seed),
        "assigners": {name: a.state_dict() for name, a in run.meta.assigners.items()},
    }
    root = checkpoint_root(run.output_dir)
    path = save_checkpoint(
        root,
        iteration,
        student=run.student,
        teacher=run.teacher,
        optimizer=run.optimizer,
        trainer_state=trainer_state,
        backbone_spec=build.backbone_spec(cfg),
        save_student=bool(cfg.checkpointing.save_student),
    )
    prune_checkpoints(root, int(cfg.checkpointing.max_to_keep), int(cfg.checkpointing.keep_every))
    logger.info("checkpoint: %s", path)
    return path
