"""Checkpoints: ``<output-dir>/ckpt/<n>/`` where n = iterations completed (a resume starts at n).

Layout of one checkpoint::

    dcp/                          student, teacher and optimizer (torch.distributed.checkpoint)
    trainer_state.pt              iteration, sampler position, teacher-target (assigner) states, seed
    teacher_backbone.safetensors  the teacher backbone, consolidated (independent of world size)
    student_backbone.safetensors  the same for the student (checkpointing.save_student)
    backbone.json                 how to rebuild the backbone (arch and its arguments)
    info.json                     human-readable summary
    manifest.json                 every other file's size and SHA-256, written last

The model and optimizer states go through DCP with FQN-keyed state dicts, so a checkpoint
written by N ranks (plain data parallel or FSDP2 shards) loads on any number of ranks. Writing is
atomic: everything goes to ``ckpt/.tmp-<n>/``, which is renamed only once complete, so a crash
never leaves a half-written ``ckpt/<n>``. Every rank must call ``save_checkpoint`` and
``load_checkpoint`` (they are collective).

A checkpoint proves it is whole by its manifest: ``is_complete`` checks that every listed file
exists with its size, ``verify_checkpoint`` also its checksum. Resuming (``pick_resume_checkpoint``,
``resume_checkpoint``) takes the newest checkpoint that verifies and loads; newer ones that do not
are named in a warning and renamed to ``ckpt/<n>.broken`` (never deleted). A write that fails
(disk full, permission) removes its own partial files and raises ``CheckpointWriteError``; the
earlier checkpoints are untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..distributed import dist

TRAINER_STATE = "trainer_state.pt"
MANIFEST = "manifest.json"
BROKEN_SUFFIX = ".broken"

logger = logging.getLogger("dino_bridge")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or none can be resumed from; the message says which and why."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (disk full, permission); its partial files are removed."""


class NoLoadableCheckpointError(CheckpointError):
    """Every checkpoint of a run failed its manifest or did not load."""


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "ckpt"


# ------------------------------------------------------------------------------------- manifests
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(path: Path, iteration: int) -> None:
    """``manifest.json``: size and SHA-256 of every other file of the checkpoint folder ``path``."""
    files = {
        file.relative_to(path).as_posix(): {"size": file.stat().st_size, "sha256": _sha256(file)}
        for file in sorted(path.rglob("*"))
        if file.is_file() and file.name != MANIFEST
    }
    _write_json(path / MANIFEST, {"format": 1, "iteration": iteration, "files": files})


def verify_checkpoint(path: str | os.PathLike, *, checksums: bool = True) -> str | None:
    """None when the checkpoint at ``path`` matches its manifest, else why not (one line).

    ``checksums=False`` checks presence and sizes only (cheap: no file is read)."""
    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST} (written before manifests existed, or interrupted)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError, OSError) as e:
        return f"{MANIFEST} is damaged ({type(e).__name__})"
    for name in (TRAINER_STATE, "dcp/.metadata"):
        if name not in files:
            return f"{MANIFEST} does not list {name}"
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != entry["size"]:
            return f"{name} is {size} bytes, the manifest says {entry['size']}"
    if checksums:
        for name, entry in files.items():
            if _sha256(path / name) != entry["sha256"]:
                return f"{name} does not match its checksum"
    return None


def is_complete(path: Path) -> bool:
    """Every file of the manifest present with its size (a cheap check; see ``verify_checkpoint``)."""
    return verify_checkpoint(path, checksums=False) is None


def _is_legacy_checkpoint(path: Path) -> bool:
    """Written before manifests existed: complete by the old rule, unverifiable."""
    return (
        not (path / MANIFEST).exists()
        and (path / TRAINER_STATE).is_file()
        and (path / "dcp" / ".metadata").is_file()
    )


def numbered_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Every ``root/<n>`` folder, newest first, whole or not."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.isdigit() and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name), reverse=True)


def find_latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The complete checkpoint (manifest present, sizes right) with the highest iteration, or None."""
    return next((p for p in numbered_checkpoints(root) if is_complete(p)), None)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` is one checkpoint, a ``ckpt`` folder, or a run's output dir: the checkpoint to load."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path does not exist: {path}")
    if is_complete(path):
        return path
    if _is_legacy_checkpoint(path):
        logger.warning("%s has no %s (an older checkpoint): its files are not verified", path, MANIFEST)
        return path
    for root in (path, path / "ckpt"):
        latest = find_latest_checkpoint(root)
        if latest is not None:
            return latest
    raise FileNotFoundError(f"no complete checkpoint (with its {MANIFEST}) found in {path}")


def set_aside(path: Path, reason: str) -> Path:
    """Rename a broken checkpoint to ``<n>.broken`` (``<n>.broken-2``, ... if taken); never deletes."""
    target = path.with_name(path.name + BROKEN_SUFFIX)
    k = 2
    while target.exists():
        target = path.with_name(f"{path.name}{BROKEN_SUFFIX}-{k}")
        k += 1
    os.replace(path, target)
    logger.warning("checkpoint %s skipped: %s; renamed to %s", path, reason, target.name)
    return target


def pick_resume_checkpoint(
    root: str | os.PathLike,
    *,
    below: int | None = None,
    rename_broken: bool = True,
    skipped: list | None = None,
) -> Path | None:
    """The newest checkpoint under ``root`` (older than ``below``) whose manifest verifies.

    Newer ones that do not verify get a warning each (and are renamed aside when
    ``rename_broken``). None when ``root`` holds no checkpoint; ``NoLoadableCheckpointError``
    when it holds some but none verifies. Rank 0 checks and renames; every rank gets its answer.
    """
    skipped = [] if skipped is None else skipped
    chosen = None
    if dist.is_main_process():
        for path in numbered_checkpoints(root):
            if below is not None and int(path.name) >= below:
                continue
            reason = verify_checkpoint(path)
            if reason is None:
                chosen = path
                break
            if rename_broken:
                set_aside(path, reason)
                skipped.append(f"{path.name} ({reason}; now {path.name}{BROKEN_SUFFIX})")
            else:
                logger.warning("checkpoint %s skipped: %s", path, reason)
                skipped.append(f"{path.name} ({reason})")
    chosen, skipped[:] = dist.broadcast_object((chosen, list(skipped)))
    if chosen is None and skipped:
        raise NoLoadableCheckpointError(_none_loads(root, skipped))
    return chosen


def _none_loads(root, skipped: list[str]) -> str:
    return (
        f"no checkpoint in {root} can be resumed: {'; '.join(skipped)}. Rename a '.broken' folder back"
        " to retry it, or start over with --no-resume (the run is moved to previous/)"
    )


def _first_line(error: BaseException) -> str:
    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}{f' ({error.filename})' if error.filename else ''}"
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def resume_checkpoint(
    path: Path,
    *,
    student: nn.Module,
    teacher: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    fallback: bool = True,
) -> tuple[Path, dict]:
    """Load ``path``; when it does not load, set it aside and fall back to the next older
    checkpoint that verifies (``fallback``: ``path`` is in this run's own ``ckpt/``).
    Returns the checkpoint that loaded and its trainer state."""
    skipped: list[str] = []
    while True:
        try:
            return path, load_checkpoint(path, student=student, teacher=teacher, optimizer=optimizer)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - any failure to load is reported
            reason = f"does not load ({_first_line(e)})"
            if not fallback:
                raise NoLoadableCheckpointError(f"checkpoint {path} {reason}") from None
        dist.barrier()
        if dist.is_main_process():
            set_aside(path, reason)
        skipped.append(f"{path.name} ({reason}; now {path.name}{BROKEN_SUFFIX})")
        dist.barrier()
        older = pick_resume_checkpoint(path.parent, below=int(path.name), skipped=skipped)
        if older is None:
            raise NoLoadableCheckpointError(_none_loads(path.parent, skipped))
        logger.warning("resuming from the older checkpoint %s instead", older)
        path = older


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
    """Write ``root/<iteration>`` atomically on every rank; returns the final path.

    A write that fails on any rank raises ``CheckpointWriteError`` on every rank after the partial
    folder is removed; the checkpoints written before stay as they are."""
    root = Path(root)
    final = root / str(iteration)
    tmp = root / f".tmp-{iteration}"

    def main_rank_writes(write) -> None:
        """Run ``write`` on rank 0; every rank learns whether it failed (one broadcast)."""
        error = None
        if dist.is_main_process():
            try:
                write()
            except (OSError, SafetensorError, RuntimeError) as e:  # torch.save: RuntimeError on ENOSPC
                error = _first_line(e)
        error = dist.broadcast_object(error)
        if error is not None:
            _write_failed(tmp, iteration, root, error)

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()

    main_rank_writes(prepare)
    state = {
        "student": get_model_state_dict(student),
        "teacher": get_model_state_dict(teacher),
        "optimizer": get_optimizer_state_dict(student, optimizer),
    }
    try:
        with _single_process_quiet():
            dcp.save(state, checkpoint_id=str(tmp / "dcp"))
    except (OSError, CheckpointException) as e:  # DCP raises on every rank when any rank fails
        dist.barrier()
        _write_failed(tmp, iteration, root, _first_line(e))
    exports = {"teacher_backbone.safetensors": full_state_dict(teacher["backbone"])}
    if save_student:
        exports["student_backbone.safetensors"] = full_state_dict(student["backbone"])

    def finish() -> None:
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
        _fsync_files(tmp)
        _write_manifest(tmp, iteration)  # last: a checkpoint with a valid manifest is whole
        _fsync_files(tmp, only=MANIFEST)
        if final.exists():  # a stale checkpoint of the same iteration: replace it
            stale = root / f".stale-{iteration}"
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)

    main_rank_writes(finish)
    dist.barrier()
    return final


def _fsync_files(folder: Path, only: str | None = None) -> None:
    for file in folder.rglob(only or "*"):
        if file.is_file():
            with open(file, "rb+") as f:
                os.fsync(f.fileno())


def _write_failed(tmp: Path, iteration: int, root: Path, error: str) -> None:
    """Remove the partial checkpoint and stop the run, naming the latest intact checkpoint."""
    if dist.is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    latest = find_latest_checkpoint(root)
    with contextlib.suppress(OSError):
        error += f" ({shutil.disk_usage(root).free / 2**20:.0f} MiB free there)"
    raise CheckpointWriteError(
        f"checkpoint {iteration} could not be written to {root}: {error}; its partial files were removed,"
        f" the earlier checkpoints are intact (latest: {latest if latest else 'none'})"
    )


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
        # strict=False only lets the ``never_stepped`` parameters through: every other state was loaded
        options = StateDictOptions(strict=not never_stepped)
        set_optimizer_state_dict(
            student, optimizer, {**state["optimizer"], "param_groups": param_groups}, options=options
        )
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
    return load_backbone_state_(backbone, load_file(str(source)), source)


def load_backbone_state_(backbone: nn.Module, state: dict[str, torch.Tensor], source: Path) -> Path:
    """Load a full backbone state dict (``source`` names it in errors), sharded or not; strict."""
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
