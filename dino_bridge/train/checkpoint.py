"""Checkpoints: ``<output-dir>/ckpt/<n>/`` where n = iterations completed (a resume starts at n).

Layout of one checkpoint::

    dcp/                          student, teacher and optimizer (torch.distributed.checkpoint)
    trainer_state.pt              iteration, sampler position, teacher-target (assigner) states, seed
    teacher_backbone.safetensors  the teacher backbone, consolidated (independent of world size)
    student_backbone.safetensors  the same for the student (checkpointing.save_student)
    backbone.json                 how to rebuild the backbone (arch and its arguments)
    info.json                     human-readable summary

The model and optimizer states go through DCP with FQN-keyed state dicts, so a checkpoint
written by N ranks (plain data parallel or FSDP2 shards) loads on any number of ranks. Writing is
atomic: everything goes to ``ckpt/.tmp-<n>/``, which is renamed only once complete, so a crash
never leaves a half-written ``ckpt/<n>``. Every rank must call ``save_checkpoint`` and
``load_checkpoint`` (they are collective).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..distributed import dist

TRAINER_STATE = "trainer_state.pt"
logger = logging.getLogger("dino_bridge")


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "ckpt"


def is_complete(path: Path) -> bool:
    return (path / TRAINER_STATE).is_file() and (path / "dcp" / ".metadata").is_file()


def find_latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest iteration under ``root``, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    candidates = [p for p in root.iterdir() if p.name.isdigit() and is_complete(p)]
    return max(candidates, key=lambda p: int(p.name)) if candidates else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` is one checkpoint, a ``ckpt`` folder, or a run's output dir: the checkpoint to load."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path does not exist: {path}")
    if is_complete(path):
        return path
    for root in (path, path / "ckpt"):
        latest = find_latest_checkpoint(root)
        if latest is not None:
            return latest
    raise FileNotFoundError(f"no complete checkpoint (with {TRAINER_STATE} and dcp/) found in {path}")


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it runs in one process when there is no process group; that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The consolidated (unsharded, CPU) state dict of ``module``; collective under FSDP2."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {
        k: v.detach().cpu().contiguous() for k, v in get_model_state_dict(module, options=options).items()
    }


def save_checkpoint(
    root: str | os.PathLike,
    iteration: int,
    *,
    student: nn.Module,
    teacher: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    backbone_spec: dict,
    save_student: bool = True,
) -> Path:
    """Write ``root/<iteration>`` atomically on every rank; returns the final path."""
    root = Path(root)
    final = root / str(iteration)
    tmp = root / f".tmp-{iteration}"
    if dist.is_main_process():
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    state = {
        "student": get_model_state_dict(student),
        "teacher": get_model_state_dict(teacher),
        "optimizer": get_optimizer_state_dict(student, optimizer),
    }
    with _single_process_quiet():
        dcp.save(state, checkpoint_id=str(tmp / "dcp"))
    exports = {"teacher_backbone.safetensors": full_state_dict(teacher["backbone"])}
    if save_student:
        exports["student_backbone.safetensors"] = full_state_dict(student["backbone"])
    if dist.is_main_process():
        for name, tensors in exports.items():
            save_file(tensors, str(tmp / name), metadata={"iteration": str(iteration)})
        torch.save(trainer_state, tmp / TRAINER_STATE)
        _write_json(tmp / "backbone.json", backbone_spec)
        _write_json(
            tmp / "info.json",
            {
                "iteration": iteration,
                "world_size": dist.get_world_size(),
                "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                "torch": torch.__version__,
            },
        )
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb+") as f:
                    os.fsync(f.fileno())
        if final.exists():  # a stale checkpoint of the same iteration (e.g. --no-resume): replace it
            stale = root / f".stale-{iteration}"
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
    dist.barrier()
    return final


# Student parts that a checkpoint may lack because it was written before they existed (the bridge:
# every checkpoint of a run whose bridge weights were 0 throughout, e.g. before this code).
OPTIONAL_PARTS = ("bridge",)


def saved_keys(path: str | os.PathLike) -> set[str]:
    """The flattened keys stored in a checkpoint's DCP folder (``student.backbone.cls_token``,
    ``optimizer.state.<fqn>.exp_avg``, …)."""
    return set(dcp.FileSystemReader(str(Path(path) / "dcp")).read_metadata().state_dict_metadata)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    student: nn.Module,
    teacher: nn.Module,
    optimizer: torch.optim.Optimizer | None,
) -> dict:
    """Load models (and optimizer) in place from one checkpoint; returns the trainer state.

    A student part of ``OPTIONAL_PARTS`` missing from the checkpoint keeps its (seeded) initial
    values, and a parameter without optimizer state in the checkpoint (one that had never been
    updated) keeps none, exactly as in the run that wrote it; each is logged once. Any other
    missing key is an error. The optimizer's param groups (lr, betas, weight decay …) come from the
    current config, not the checkpoint: the schedules set them every step.
    """
    path = Path(path)
    saved = saved_keys(path)
    state = {"student": get_model_state_dict(student), "teacher": get_model_state_dict(teacher)}
    fresh = sorted(k for k in state["student"] if f"student.{k}" not in saved)
    missing = [k for k in fresh if k.split(".")[0] not in OPTIONAL_PARTS]
    missing += [f"teacher.{k}" for k in state["teacher"] if f"teacher.{k}" not in saved]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} model tensors, e.g. {missing[:5]}")
    for key in fresh:
        del state["student"][key]
    parts = sorted({k.split(".")[0] for k in fresh})
    if parts:
        logger.info("%s has no %s: starting from its initialisation", path, " or ".join(parts))
    unused = sorted(
        {k.split(".")[1] for k in saved if k.startswith("student.")}
        - {k.split(".")[0] for k in student.state_dict()}
    )
    if unused:
        logger.info("%s holds %s, which this run does not have: not loaded", path, ", ".join(unused))
    if optimizer is not None:
        optim_state = get_optimizer_state_dict(student, optimizer)
        param_groups = optim_state.pop("param_groups")
        never_stepped = [fqn for fqn in optim_state["state"] if f"optimizer.state.{fqn}.step" not in saved]
        for fqn in never_stepped:
            del optim_state["state"][fqn]
        state["optimizer"] = optim_state
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path / "dcp"))
    set_model_state_dict(student, state["student"], options=StateDictOptions(strict=False))
    set_model_state_dict(teacher, state["teacher"])
    if optimizer is not None:
        set_optimizer_state_dict(student, optimizer, {**state["optimizer"], "param_groups": param_groups})
        for fqn in never_stepped:  # ``get_optimizer_state_dict`` filled every state; undo it for these
            _drop_state(student, optimizer, fqn)
    return torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=False)


def _drop_state(model: nn.Module, optimizer: torch.optim.Optimizer, fqn: str) -> None:
    param = model.get_parameter(fqn)
    optimizer.state.pop(param, None)


def backbone_weights_file(path: str | os.PathLike, which: str = "teacher") -> Path:
    """A ``.safetensors`` backbone file, or the ``which`` (teacher/student) backbone export of a
    checkpoint, a ``ckpt`` folder or a run dir (its latest checkpoint)."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: backbone weights must be a .safetensors file or a checkpoint folder")
        return path
    weights = resolve_checkpoint(path) / f"{which}_backbone.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found (was checkpointing.save_student false?)")
    return weights


def load_backbone_weights_(backbone: nn.Module, path: str | os.PathLike) -> Path:
    """Load full (consolidated) backbone weights into ``backbone``, sharded or not; strict."""
    from safetensors.torch import load_file

    source = backbone_weights_file(path)
    state = load_file(str(source))
    shapes = {k: tuple(v.shape) for k, v in get_model_state_dict(backbone).items()}
    missing, unexpected = sorted(shapes.keys() - state.keys()), sorted(state.keys() - shapes.keys())
    resized = [
        f"{k} {tuple(state[k].shape)} vs {shapes[k]}"
        for k in sorted(shapes.keys() & state.keys())
        if tuple(state[k].shape) != shapes[k]
    ]
    if missing or unexpected or resized:
        raise ValueError(
            f"{source} does not match the configured backbone: {len(missing)} missing keys"
            f" {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]},"
            f" {len(resized)} of another shape (file vs model) {resized[:5]}"
        )
    set_model_state_dict(backbone, state, options=StateDictOptions(full_state_dict=True))
    return source


def prune_checkpoints(root: str | os.PathLike, max_to_keep: int, keep_every: int = 0) -> list[Path]:
    """Delete all but the ``max_to_keep`` newest checkpoints, sparing multiples of ``keep_every``."""
    root = Path(root)
    if not dist.is_main_process() or not root.is_dir() or max_to_keep <= 0:
        return []
    done = sorted((p for p in root.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    removed = []
    for old in done[: max(0, len(done) - max_to_keep)]:
        if keep_every > 0 and int(old.name) % keep_every == 0:
            continue
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old)
    return removed
