"""One run per output directory: check the directory, move an earlier run aside, and make config
changes on resume explicit.

The rules (README, "When things go wrong"):

- ``--output-dir`` must be a directory that can be created and written; otherwise a one-line error.
- A directory holds one run. Starting over in a directory that holds a run (``--no-resume``, a
  ``--checkpoint_dir`` from elsewhere, or an earlier run that never wrote a checkpoint) first moves
  that run's files (``ckpt/``, ``metrics.jsonl``, ``config.yaml``, ``train.log``, ...) into
  ``previous/<time stamp>/``, with a log line; nothing is deleted. Resuming from an older
  checkpoint of the same run (``--checkpoint_dir <dir>/ckpt/<n>``) moves the newer checkpoints
  (and a copy of ``metrics.jsonl``) there too, so a later plain rerun cannot pick them up.
- On resume, the new resolved config is compared with the run's ``config.yaml`` before anything
  is written. A change the checkpoint cannot take (``INCOMPATIBLE``) stops with exit code 2
  and lists the keys; any other change is logged key by key (old -> new) and the earlier config
  is kept as ``config.<iteration>.yaml``.

Rank 0 moves and writes; every rank gets the same answers (one broadcast per decision).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from ..config import ConfigError, save_config, to_plain
from ..distributed import dist
from .checkpoint import (
    MANIFEST,
    TRAINER_STATE,
    checkpoint_root,
    numbered_checkpoints,
    pick_resume_checkpoint,
    verify_checkpoint,
)

logger = logging.getLogger("dino_bridge")

PREVIOUS = "previous"
# What a run writes into its directory (config.<iteration>.yaml files are matched separately).
RUN_FILES = (
    "ckpt",
    "metrics.jsonl",
    "config.yaml",
    "train.log",
    "run_summary.json",
    "quickstart_results.json",
    "report",
)
IGNORED_KEYS = frozenset({"train.output_dir"})  # where the run lives, not what it is


def _differs(old: Any, new: Any) -> bool:
    return old != new


def _nullness_differs(old: Any, new: Any) -> bool:
    return (old is None) != (new is None)


# Keys whose change a checkpoint cannot take (the shapes of its tensors, or which tensors exist):
# key -> whether a change from old to new is one. Everything else is compatible and logged —
# including MODEL.META_ARCHITECTURE and resize_shuffle_augmentor.*: the invariance streams may be
# switched on in a resumed run.
INCOMPATIBLE: dict[str, Callable[[Any, Any], bool]] = {
    **{
        f"student.{key}": _differs
        for key in (
            "arch",
            "patch_size",
            "ffn_layer",
            "ffn_ratio",
            "embed_dim",
            "depth",
            "num_heads",
            "norm_layer",
            "n_storage_tokens",
            "qkv_bias",
            "proj_bias",
            "ffn_bias",
            "mask_k_bias",
            "untie_cls_and_patch_norms",
            "untie_global_and_local_cls_norm",
            "in_chans",
            "pos_embed_type",
        )
    },
    "student.layerscale": _nullness_differs,  # the LayerScale parameters exist or not
    **{
        f"{head}.{key}": _differs
        for head in ("dino", "ibot")
        for key in ("head_n_prototypes", "head_bottleneck_dim", "head_nlayers", "head_hidden_dim")
    },
    "ibot.separate_head": _differs,
}
ASSIGNER_KEYS = ("dtch.enabled", "train.centering")  # together: the teacher-target kind


def _assigner_kind(flat: dict) -> Any:
    return "dtch" if flat.get("dtch.enabled") else flat.get("train.centering")


# --------------------------------------------------------------------------------- comparing
_ABSENT = "<absent>"


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """key -> (old, new) for every key whose resolved value differs (``<absent>`` on one side)."""
    a, b = flatten(old), flatten(new)
    return {
        key: (a.get(key, _ABSENT), b.get(key, _ABSENT))
        for key in sorted(a.keys() | b.keys())
        if key not in IGNORED_KEYS and a.get(key, _ABSENT) != b.get(key, _ABSENT)
    }


def incompatible_keys(changes: dict[str, tuple[Any, Any]], old: dict, new: dict) -> list[str]:
    """The changed keys that the checkpoint cannot take."""
    keys = [key for key, (a, b) in changes.items() if key in INCOMPATIBLE and INCOMPATIBLE[key](a, b)]
    if _assigner_kind(flatten(old)) != _assigner_kind(flatten(new)):
        keys += [key for key in ASSIGNER_KEYS if key in changes]
    return keys


def _shown(value: Any) -> str:
    return value if value is _ABSENT else repr(value)


# ---------------------------------------------------------------------------- the directory
def check_output_dir(output_dir: Path) -> None:
    """Create ``output_dir`` (rank 0) or raise ``ConfigError`` saying why it cannot be used."""
    error = None
    if dist.is_main_process():
        error = _output_dir_problem(output_dir)
    error = dist.broadcast_object(error)
    if error is not None:
        raise ConfigError(error)


def _output_dir_problem(output_dir: Path) -> str | None:
    if output_dir.exists() and not output_dir.is_dir():
        return f"--output-dir {output_dir} is a file, not a directory"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"--output-dir {output_dir} cannot be created: {e.strerror or e}"
    if not os.access(output_dir, os.W_OK | os.X_OK):
        return f"--output-dir {output_dir} is not writable"
    return None


def run_files(output_dir: Path) -> list[Path]:
    """The files and folders of a run in ``output_dir`` (empty: it holds no run). An empty
    folder is nothing to keep (``ckpt/`` may be a mount point made for the run)."""
    found = [output_dir / name for name in RUN_FILES if (output_dir / name).exists()]
    found += sorted(output_dir.glob("config.*.yaml"))
    return [p for p in found if not (p.is_dir() and not any(p.iterdir()))]


def _new_previous_dir(output_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, k = output_dir / PREVIOUS / stamp, 2
    while target.exists():
        target, k = output_dir / PREVIOUS / f"{stamp}-{k}", k + 1
    target.mkdir(parents=True)
    return target


def _move(path: Path, target: Path) -> None:
    try:
        os.replace(path, target)
    except OSError as e:
        if e.errno != errno.EXDEV:  # e.g. a mount point: it cannot be moved
            raise
        shutil.move(path, target)  # another file system: copy, then remove the original


def _on_main(work: Callable[[], str | None]) -> str | None:
    """Run ``work`` on rank 0; every rank gets its note, or the ``ConfigError`` it raised."""
    note, error = None, None
    if dist.is_main_process():
        try:
            note = work()
        except OSError as e:
            error = f"cannot move the earlier run aside ({e.strerror or e}: {e.filename}); move it yourself"
    note, error = dist.broadcast_object((note, error))
    dist.barrier()
    if error is not None:
        raise ConfigError(error)
    return note


def move_run_aside(output_dir: Path, why: str) -> str | None:
    """Move the run in ``output_dir`` into ``previous/<time stamp>/`` (rank 0); returns the log line."""

    def work() -> str | None:
        files = run_files(output_dir)
        if not files:
            return None
        target = _new_previous_dir(output_dir)
        for path in files:
            _move(path, target / path.name)
        names = ", ".join(p.name + ("/" if (target / p.name).is_dir() else "") for p in files)
        return f"{why}: moved the earlier run's files ({names}) to {target.relative_to(output_dir)}/"

    return _on_main(work)


def move_newer_checkpoints_aside(output_dir: Path, iteration: int) -> str | None:
    """Resuming this run from an older checkpoint: the newer ones (and the metrics as they were)
    go to ``previous/<time stamp>/``, so that a later rerun resumes from the new branch only."""

    def work() -> str | None:
        newer = [p for p in numbered_checkpoints(checkpoint_root(output_dir)) if int(p.name) > iteration]
        if not newer:
            return None
        target = _new_previous_dir(output_dir)
        (target / "ckpt").mkdir()
        for path in newer:
            _move(path, target / "ckpt" / path.name)
        for name in ("metrics.jsonl", "config.yaml"):
            if (output_dir / name).is_file():
                shutil.copy2(output_dir / name, target / name)
        names = ", ".join(f"ckpt/{p.name}" for p in newer)
        return (
            f"resuming from iteration {iteration}: moved the newer checkpoints ({names}) and a copy of"
            f" metrics.jsonl to {target.relative_to(output_dir)}/"
        )

    return _on_main(work)


def _explicit_checkpoint(checkpoint_dir: str) -> Path:
    """``--checkpoint_dir``: one checkpoint that verifies, or the newest in a ckpt folder / run dir."""
    source = Path(checkpoint_dir)
    if not source.exists():
        raise ConfigError(f"--checkpoint_dir {source} does not exist")
    if (source / MANIFEST).exists() or (source / TRAINER_STATE).exists() or (source / "dcp").exists():
        reason = verify_checkpoint(source)
        if reason is not None and not (source / MANIFEST).exists() and (source / TRAINER_STATE).is_file():
            logger.warning("--checkpoint_dir %s: %s; resuming from it unverified, as asked", source, reason)
            return source
        if reason is not None:
            raise ConfigError(f"--checkpoint_dir {source} cannot be resumed from: {reason}")
        return source
    root = source / "ckpt" if (source / "ckpt").is_dir() else source
    picked = pick_resume_checkpoint(root, rename_broken=False)  # not this run's: look, do not touch
    if picked is None:
        raise ConfigError(f"--checkpoint_dir {source} holds no checkpoint")
    return picked


# ----------------------------------------------------------------------------- the run's plan
@dataclass
class RunDir:
    """Where a run starts from, decided before anything of it is written."""

    output_dir: Path
    resume: bool
    explicit: Path | None = None  # the --checkpoint_dir checkpoint
    notes: list[str] = field(default_factory=list)
    start: Path | None = None  # the checkpoint to resume from (after ``resume_point``)
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    @classmethod
    def prepare(cls, output_dir: str | Path, checkpoint_dir: str | None, resume: bool) -> RunDir:
        """Check the output dir and move an earlier run aside where this one starts over.

        Call it before the log file is opened (``train.log`` may be among the files moved)."""
        output_dir = Path(output_dir)
        check_output_dir(output_dir)
        plan = cls(output_dir, resume)
        own_root = checkpoint_root(output_dir).resolve()
        if checkpoint_dir:
            plan.explicit = _explicit_checkpoint(checkpoint_dir)
            if plan.explicit.resolve().parent == own_root:
                note = move_newer_checkpoints_aside(output_dir, int(plan.explicit.name))
            else:
                note = move_run_aside(output_dir, f"resuming from {plan.explicit} in another run's directory")
        elif not resume:
            note = move_run_aside(output_dir, "--no-resume")
        elif not numbered_checkpoints(own_root):
            note = move_run_aside(output_dir, "starting over (the earlier run has no checkpoint)")
        else:
            note = None
        plan.notes += [note] if note else []
        return plan

    @property
    def owns_start(self) -> bool:
        """The start checkpoint is this run's own (a broken one may be renamed aside)."""
        own_root = checkpoint_root(self.output_dir).resolve()
        return self.start is not None and self.start.resolve().parent == own_root

    def _previous_config(self) -> Path | None:
        if self.explicit is None:
            return self.output_dir / "config.yaml"
        return self.explicit.resolve().parent.parent / "config.yaml"  # <run>/ckpt/<n>

    def resume_point(self, cfg: DictConfig) -> Path | None:
        """Compare ``cfg`` with the run's config (incompatible: ``ConfigError``), then pick the
        newest checkpoint that verifies; None for a fresh start."""
        for note in self.notes:
            logger.info(note)
        own = numbered_checkpoints(checkpoint_root(self.output_dir))
        if self.explicit is None and not (self.resume and own):
            return None
        self._compare(cfg)
        if self.explicit is not None:
            self.start = self.explicit
        else:
            self.start = pick_resume_checkpoint(checkpoint_root(self.output_dir))
        return self.start

    def _compare(self, cfg: DictConfig) -> None:
        source = self._previous_config()
        if source is None or not source.is_file():
            logger.warning("no config.yaml next to the checkpoints: the config cannot be compared")
            return
        try:
            old = yaml.safe_load(source.read_text()) or {}
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
            logger.warning("%s cannot be read (%s): the config cannot be compared", source, type(e).__name__)
            return
        new = to_plain(cfg)
        changes = config_changes(old, new)
        blocked = incompatible_keys(changes, old, new)
        if blocked:
            listed = ", ".join(f"{k} ({_shown(changes[k][0])} -> {_shown(changes[k][1])})" for k in blocked)
            raise ConfigError(
                f"cannot resume the run in {self.output_dir} with this config: its checkpoints cannot take"
                f" {listed}. Start a new run in another --output-dir (or use --no-resume)"
            )
        self.changes = changes
        for key, (a, b) in changes.items():
            logger.info("config changed on resume: %s: %s -> %s", key, _shown(a), _shown(b))

    def save_config(self, cfg: DictConfig) -> None:
        """Write ``config.yaml`` (rank 0); a changed config keeps the earlier one as
        ``config.<iteration>.yaml``."""
        if not dist.is_main_process():
            return
        current = self.output_dir / "config.yaml"
        if self.changes and self.start is not None and current.is_file():
            kept = _free_name(self.output_dir, f"config.{int(self.start.name)}")
            shutil.copy2(current, kept)
            logger.info("the earlier config is kept as %s", kept.name)
        save_config(cfg, current)


def _free_name(folder: Path, stem: str) -> Path:
    path, k = folder / f"{stem}.yaml", 2
    while path.exists():
        path, k = folder / f"{stem}-{k}.yaml", k + 1
    return path
