"""Run integrity: one run per directory, checkpoints that prove they are whole, failed writes that
stop cleanly, config changes on resume made explicit, and exit codes that say how a run ended."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dino_bridge.train import args as train_args
from dino_bridge.train import checkpoint as ckpt_module
from dino_bridge.train.checkpoint import (
    MANIFEST,
    NoLoadableCheckpointError,
    _write_manifest,
    find_latest_checkpoint,
    is_complete,
    verify_checkpoint,
)
from dino_bridge.train.meta_arch import SSLMetaArch
from dino_bridge.train.run_dir import config_changes, incompatible_keys
from tests.helpers import CONFIGS, LOSS_KEYS, REPO, make_image_folder, read_metrics, run_training, tiny_config
from tests.helpers import tiny_overrides as overrides


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"), n=24)


def _losses(output_dir: Path) -> dict[int, list[float]]:
    return {r["iteration"]: [r[k] for k in LOSS_KEYS] for r in read_metrics(output_dir)}


@pytest.fixture(scope="module")
def full(images, tmp_path_factory) -> dict[int, list[float]]:
    """The losses of an uninterrupted 6-iteration run (checkpoints every 2)."""
    out = tmp_path_factory.mktemp("full") / "run"
    run_training(tiny_config(images, iterations=6, period=2), out)
    return _losses(out)


@pytest.fixture(scope="module")
def part(images, tmp_path_factory) -> Path:
    """The same run stopped at iteration 4: checkpoints 2 and 4."""
    out = tmp_path_factory.mktemp("part") / "run"
    run_training(tiny_config(images, iterations=6, period=2, extra=["train.stop_at_iteration=4"]), out)
    return out


def _link_copy(run: Path, to: Path) -> Path:
    """A copy of a run dir by hard links (fast); damage files only by replacing them."""
    shutil.copytree(run, to, copy_function=os.link)
    return to


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # a new inode: the hard-linked original stays intact


def _cli(images: Path, output: Path, *extra: str, iterations: int = 6, period: int = 2) -> list[str]:
    return [
        "--config-file",
        str(CONFIGS / "smoke_cpu.yaml"),
        "--output-dir",
        str(output),
        *overrides(images, iterations=iterations, period=period),
        *extra,
    ]


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------- one run per directory
def test_no_resume_moves_the_earlier_run_aside_and_a_rerun_resumes_the_new_one(images, tmp_path):
    out = tmp_path / "run"
    run_training(tiny_config(images, iterations=4, period=2), out)  # the earlier run, finished
    earlier = _tree_digest(out)
    stopped_early = tiny_config(images, iterations=4, period=2, extra=["train.stop_at_iteration=2"])
    run_training(stopped_early, out, resume=False)
    (previous,) = (out / "previous").iterdir()
    assert _tree_digest(previous) == earlier  # moved whole, nothing deleted or changed
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["2"]
    assert (
        "--no-resume: moved the earlier run's files (ckpt/, metrics.jsonl, config.yaml"
        in (out / "train.log").read_text()
    )
    run_training(tiny_config(images, iterations=4, period=2), out)  # the same command without it
    log = (out / "train.log").read_text()
    assert f"resuming from {out / 'ckpt' / '2'}" in log and "nothing to train" not in log
    assert sorted(_losses(out)) == [0, 1, 2, 3]
    assert _tree_digest(previous) == earlier


def test_resuming_from_an_older_checkpoint_moves_the_newer_ones_aside(images, part, tmp_path):
    out = _link_copy(part, tmp_path / "run")
    run_training(tiny_config(images, iterations=6, period=2), out, checkpoint_dir=str(out / "ckpt" / "2"))
    (previous,) = (out / "previous").iterdir()
    assert (previous / "ckpt" / "4" / MANIFEST).is_file() and (previous / "metrics.jsonl").is_file()
    assert sorted(_losses(out)) == list(range(6))
    assert find_latest_checkpoint(out / "ckpt").name == "6"


# ---------------------------------------------------------------------- checkpoints prove it
def test_every_file_of_a_checkpoint_is_covered_by_its_manifest(part, tmp_path):
    ckpt = _link_copy(part / "ckpt" / "2", tmp_path / "2")
    names = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)
    assert len(names) >= 7 and verify_checkpoint(ckpt) is None
    for name in names:
        path = ckpt / name
        original = path.read_bytes()
        _replace(path, original[: len(original) // 2])
        assert name in verify_checkpoint(ckpt) and not is_complete(ckpt), name
        _replace(path, bytes([original[0] ^ 0xFF]) + original[1:])  # same size: only the checksum sees it
        assert is_complete(ckpt) and verify_checkpoint(ckpt) == f"{name} does not match its checksum"
        _replace(path, original)
    assert verify_checkpoint(ckpt) is None
    (ckpt / MANIFEST).unlink()
    assert "no manifest.json" in verify_checkpoint(ckpt) and find_latest_checkpoint(tmp_path) is None


def _truncate(path: Path) -> None:
    _replace(path, path.read_bytes()[: path.stat().st_size // 3])


DAMAGES = {
    "dcp-shard-truncated": lambda c: _truncate(c / "dcp" / "__0_0.distcp"),
    "dcp-metadata-truncated": lambda c: _truncate(c / "dcp" / ".metadata"),
    "trainer-state-truncated": lambda c: _truncate(c / "trainer_state.pt"),
    "teacher-export-truncated": lambda c: _truncate(c / "teacher_backbone.safetensors"),
    "manifest-missing": lambda c: (c / MANIFEST).unlink(),
    "verifies-but-does-not-load": lambda c: (
        _replace(c / "trainer_state.pt", b"junk"),
        (c / MANIFEST).unlink(),  # a new manifest file, not a write through the hard link
        _write_manifest(c, 4),
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_run_continues_exactly(
    images, full, part, tmp_path, damage
):
    out = _link_copy(part, tmp_path / "run")
    DAMAGES[damage](out / "ckpt" / "4")
    run_training(tiny_config(images, iterations=6, period=2), out)
    log = (out / "train.log").read_text()
    assert f"checkpoint {out / 'ckpt' / '4'} skipped: " in log and "renamed to 4.broken" in log
    assert (out / "ckpt" / "4.broken").is_dir()  # set aside, never deleted
    assert f"{out / 'ckpt' / '2'}" in log.split("renamed to 4.broken", 1)[1]  # resumed from 2
    resumed = _losses(out)
    assert sorted(resumed) == list(range(6))
    for it in range(6):
        assert resumed[it] == full[it], f"iteration {it} after resuming past a damaged checkpoint"


def test_when_no_checkpoint_loads_the_run_stops_listing_them(images, part, tmp_path, capsys):
    out = _link_copy(part, tmp_path / "run")
    for n in ("2", "4"):
        _replace(out / "ckpt" / n / "trainer_state.pt", b"x")
    assert train_args.main(_cli(images, out)) == 2
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if "can be resumed" in x]
    assert line and "4 (trainer_state.pt is 1 bytes" in line[0] and "2 (trainer_state.pt" in line[0], err
    assert "Traceback" not in err
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["2.broken", "4.broken"]
    with pytest.raises(NoLoadableCheckpointError):
        ckpt_module.pick_resume_checkpoint(part / "ckpt", rename_broken=False, skipped=["x"], below=1)


# ------------------------------------------------------------------------- failed writes
def test_a_checkpoint_write_that_fills_the_disk_stops_the_run_cleanly(
    images, full, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    original, calls = ckpt_module.save_file, {"n": 0}

    def disk_full_on_the_second_checkpoint(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 3:  # checkpoint 4's first export
            Path(filename).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return original(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt_module, "save_file", disk_full_on_the_second_checkpoint)
    assert train_args.main(_cli(images, out)) == train_args.EXIT_CHECKPOINT_WRITE
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "checkpoint 4 could not be written" in err and "No space left on device" in err
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["2"]  # no partial .tmp-4 left
    assert verify_checkpoint(out / "ckpt" / "2") is None
    monkeypatch.setattr(ckpt_module, "save_file", original)  # space again: the same command resumes
    assert train_args.main(_cli(images, out)) == 0
    assert _losses(out) == full


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d && echo ok"],
        capture_output=True,
        text=True,
    )
    return probe.stdout.strip() == "ok"


@pytest.mark.skipif(
    not _can_mount_tmpfs(), reason="cannot mount a tmpfs here (the write-hook test covers it)"
)
def test_a_full_tmpfs_stops_the_run_with_the_previous_checkpoint_intact(images, tmp_path):
    out, kept = tmp_path / "run", tmp_path / "kept"
    (out / "ckpt").mkdir(parents=True)
    # one checkpoint of this run is ~130 MB: room for the first, not for the second
    script = (
        'mount -t tmpfs -o size=200m tmpfs "$1/ckpt" || exit 97; shift 2; "$@"; rc=$?;'
        ' cp -a "$OUT_DIR/ckpt" "$KEPT"; exit $rc'
    )
    cmd = [sys.executable, "-m", "dino_bridge.train", *_cli(images, out, iterations=4)]
    env = {**os.environ, "OUT_DIR": str(out), "KEPT": str(kept)}
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", str(out), "x", *cmd],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == train_args.EXIT_CHECKPOINT_WRITE, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-5000:]
    assert "checkpoint 4 could not be written" in done.stderr and " MiB free there" in done.stderr
    assert sorted(p.name for p in kept.iterdir()) == ["2"]
    assert verify_checkpoint(kept / "2") is None


# ----------------------------------------------------------------------- config on resume
def test_an_incompatible_resume_exits_2_and_touches_nothing(images, part, tmp_path, capsys):
    out = _link_copy(part, tmp_path / "run")
    before = {"config.yaml": (out / "config.yaml").read_bytes(), **_tree_digest(out / "ckpt")}
    changed = ["student.arch=vit_small", "dino.head_n_prototypes=128", "dtch.enabled=false", "train.seed=3"]
    assert train_args.main(_cli(images, out, *changed)) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "cannot resume" in x]
    for key in ("student.arch", "dino.head_n_prototypes", "dtch.enabled"):
        assert key in line, line
    assert "train.seed" not in line  # a compatible change is not listed as blocking
    assert "Traceback" not in err
    assert {"config.yaml": (out / "config.yaml").read_bytes(), **_tree_digest(out / "ckpt")} == before
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in part.iterdir())


def test_a_compatible_change_is_logged_and_the_earlier_config_kept(images, part, tmp_path):
    out = _link_copy(part, tmp_path / "run")
    earlier = (out / "config.yaml").read_bytes()
    cfg = tiny_config(
        images, iterations=6, period=2, extra=["schedules.lr.peak=1e-4", "checkpointing.max_to_keep=5"]
    )
    run_training(cfg, out)
    log = (out / "train.log").read_text()
    assert "config changed on resume: schedules.lr.peak: 0.0005 -> 0.0001" in log
    assert "config changed on resume: checkpointing.max_to_keep: 10 -> 5" in log
    assert "config changed on resume: train.stop_at_iteration: 4 -> None" in log
    assert (out / "config.4.yaml").read_bytes() == earlier
    assert "peak: 0.0001" in (out / "config.yaml").read_text()
    assert sorted(_losses(out)) == list(range(6))


def test_which_changes_a_checkpoint_can_take():
    old = {
        "student": {"arch": "vit_tiny", "layerscale": 1e-5},
        "dtch": {"enabled": True},
        "train": {"centering": "a"},
    }
    streams = {
        "MODEL": {"META_ARCHITECTURE": "SSLResizeShuffle"},
        "resize_shuffle_augmentor": {"patch_size": 8},
    }
    for new, blocked in [
        ({**old, "student": {"arch": "vit_tiny", "layerscale": 1e-4}}, []),  # the init value only
        ({**old, "student": {"arch": "vit_tiny", "layerscale": None}}, ["student.layerscale"]),
        ({**old, "student": {"arch": "vit_small", "layerscale": 1e-5}}, ["student.arch"]),
        ({**old, "train": {"centering": "b"}}, []),  # DTCH stays the teacher-target kind
        ({**old, "dtch": {"enabled": False}}, ["dtch.enabled"]),
        ({**old, **streams}, []),  # the invariance streams may be switched on in a resumed run
    ]:
        assert incompatible_keys(config_changes(old, new), old, new) == blocked, new
    assert config_changes({"train": {"output_dir": "a"}}, {"train": {"output_dir": "b"}}) == {}


# ------------------------------------------------------------------------------ exit codes
def test_non_finite_losses_and_unreadable_data_have_their_own_exit_codes(images, tmp_path, monkeypatch):
    original = SSLMetaArch.compute_losses

    def always_nan(self, ctx):
        total, terms, weights = original(self, ctx)
        return total * float("nan"), terms, weights

    with monkeypatch.context() as m:
        m.setattr(SSLMetaArch, "compute_losses", always_nan)
        assert train_args.main(_cli(images, tmp_path / "nan")) == train_args.EXIT_NON_FINITE == 3
    last = (tmp_path / "nan" / "train.log").read_text().splitlines()[-1]
    assert "ERROR training stopped at iteration 2: 3 consecutive non-finite steps" in last

    listing = tmp_path / "list.txt"
    listing.write_text("missing_a.png\nmissing_b.png\n")
    data = ["data.fashion_mnist.root=null", f"data.fashion_mnist.txt_path={listing}", "train.num_workers=1"]
    assert train_args.main(_cli(images, tmp_path / "nodata", *data)) == train_args.EXIT_UNREADABLE_DATA == 4
    last = (tmp_path / "nodata" / "train.log").read_text().splitlines()[-1]
    assert "ERROR every attempt to load an image for stream position" in last  # the reason, one line
    assert "missing_a.png" in last and "Traceback" not in last  # unwrapped from the DataLoader worker
