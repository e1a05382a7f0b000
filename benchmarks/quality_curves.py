"""Learning curves on Fashion-MNIST: teacher 20-NN every N iterations, against iterations and seconds.

Each variant (overrides of a base config, by default the quickstart recipe) is trained once per
seed with a checkpoint every ``--every`` iterations; every checkpoint's teacher is then evaluated by
20-NN. Protocols: ``val`` (the default, for choosing a recipe) measures 2 000 *train-split* images
against 10 000 other train-split images; ``test`` measures the quickstart's split (2 000 test
images against the same 10 000 train images) and is meant to be run once, for the chosen recipe.
Raw pixels on the same split are the line to beat. Writes JSON (after every run: ``--resume`` keeps
finished runs) and a PNG of the curves (mean over seeds, min–max band).

    python benchmarks/quality_curves.py --variants quickstart --seeds 0 1 2 --every 50
    python benchmarks/quality_curves.py --variants quickstart --iterations 3000 --seeds 0 \\
        --every 250 --json benchmarks/results/curve_60min.json        # a long run
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dino_bridge.config import load_config  # noqa: E402
from dino_bridge.data import FashionMNIST  # noqa: E402
from dino_bridge.eval import eval_transform_for, extract_features, knn_accuracy, load_backbone  # noqa: E402
from dino_bridge.train.checkpoint import checkpoint_root, numbered_checkpoints  # noqa: E402

BASE_CONFIG = REPO / "configs" / "quickstart.yaml"

# name -> overrides of the base config (the recipes compared; "quickstart" is the base as shipped)
_SMALL = ["student.depth=4", "student.embed_dim=128", "student.num_heads=4"]
VARIANTS: dict[str, list[str]] = {
    "quickstart": [],
    # vit_tiny (12 x 192) against 4 blocks x 128: about 2x the images per second, so twice the epochs
    # in the same time
    "small4x128": [*_SMALL, "optim.epochs=14"],
    "small4x128_lr2e-3": [*_SMALL, "optim.epochs=14", "schedules.lr.peak=2e-3"],
}


def split(protocol: str) -> tuple[tuple[str, np.ndarray], tuple[str, np.ndarray]]:
    """((split, indices) of the kNN train images, (split, indices) of the evaluated images)."""
    train_idx = np.sort(np.random.default_rng(0).permutation(60000)[:10000])
    if protocol == "test":
        return ("train", train_idx), ("test", np.sort(np.random.default_rng(1).permutation(10000)[:2000]))
    rest = np.setdiff1d(np.arange(60000), train_idx)
    return ("train", train_idx), ("train", np.sort(np.random.default_rng(2).permutation(rest)[:2000]))


def _pixels(source: FashionMNIST, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    feats = torch.stack(
        [torch.from_numpy(np.asarray(source.load(int(i)).convert("L")).copy()).flatten() for i in indices]
    )
    return feats.float(), torch.tensor([source.labels[int(i)] for i in indices])


def raw_pixel_knn(protocol: str) -> float:
    (train_split, train_idx), (val_split, val_idx) = split(protocol)
    train_x, train_y = _pixels(FashionMNIST(train_split), train_idx)
    val_x, val_y = _pixels(FashionMNIST(val_split), val_idx)
    return knn_accuracy(train_x, train_y, val_x, val_y, ks=(20,))[20]


def encoder_knn(checkpoint: Path, protocol: str) -> float:
    model, spec = load_backbone(checkpoint)
    transform = eval_transform_for(spec)
    (train_split, train_idx), (val_split, val_idx) = split(protocol)
    train_x, train_y = extract_features(model, FashionMNIST(train_split), transform, indices=train_idx)
    val_x, val_y = extract_features(model, FashionMNIST(val_split), transform, indices=val_idx)
    return knn_accuracy(train_x, train_y, val_x, val_y, ks=(20,))[20]


def run_one(variant: str, seed: int, args, workdir: Path) -> dict:
    from dino_bridge.distributed.device import setup_runtime
    from dino_bridge.train.loop import train

    overrides = [*VARIANTS[variant], f"train.seed={seed}", *args.overrides]
    overrides += [f"checkpointing.period={args.every}", "checkpointing.max_to_keep=0"]
    if args.iterations:
        overrides += [f"train.stop_at_iteration={args.iterations}"]
    cfg = load_config(args.config, overrides)
    out = workdir / f"{variant}_seed{seed}"
    start = time.time()
    train(cfg, setup_runtime("cpu"), out, resume=False)
    train_seconds = time.time() - start
    points = []
    for ckpt in reversed(numbered_checkpoints(checkpoint_root(out))):  # oldest first
        seconds = (ckpt / "manifest.json").stat().st_mtime - start
        points.append(
            {
                "iteration": int(ckpt.name),
                "seconds": round(seconds, 1),
                "knn20": encoder_knn(ckpt, args.protocol),
            }
        )
        print(
            f"  {variant} seed {seed} it {ckpt.name} ({seconds:.0f} s): 20-NN {points[-1]['knn20']:.2f}%",
            flush=True,
        )
    return {"variant": variant, "seed": seed, "train_seconds": round(train_seconds, 1), "points": points}


def curves_png(results: list[dict], raw: float, path: Path, protocol: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for variant in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == variant]
        iterations = sorted({p["iteration"] for r in runs for p in r["points"]})
        at = {it: [p for r in runs for p in r["points"] if p["iteration"] == it] for it in iterations}
        mean = [statistics.mean(p["knn20"] for p in at[it]) for it in iterations]
        low = [min(p["knn20"] for p in at[it]) for it in iterations]
        high = [max(p["knn20"] for p in at[it]) for it in iterations]
        seconds = [statistics.mean(p["seconds"] for p in at[it]) for it in iterations]
        label = f"{variant} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
        for ax, x in ((axes[0], iterations), (axes[1], seconds)):
            (line,) = ax.plot(x, mean, marker="o", markersize=3, label=label)
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2)
    for ax, xlabel in ((axes[0], "iterations"), (axes[1], "seconds of training (2 CPU cores)")):
        ax.axhline(raw, color="black", linestyle="--", label=f"raw pixels ({raw:.1f}%)")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"teacher 20-NN top-1 (%), {protocol} protocol")
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle("Fashion-MNIST: 20-NN of the teacher CLS during pretraining")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: list[dict], raw: float) -> str:
    lines = [
        "| variant | seeds | last iteration | seconds | 20-NN top-1 (%) at the end |",
        "|---|---:|---:|---:|---:|",
    ]
    for variant in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == variant and r["points"]]
        finals = [r["points"][-1]["knn20"] for r in runs]
        std = f" ± {statistics.stdev(finals):.2f}" if len(finals) > 1 else ""
        last = runs[0]["points"][-1]
        seconds = statistics.mean(r["points"][-1]["seconds"] for r in runs)
        lines.append(
            f"| {variant} | {len(runs)} | {last['iteration']} | {seconds:.0f}"
            f" | {statistics.mean(finals):.2f}{std} |"
        )
    lines.append(f"| raw pixels | – | – | – | {raw:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(BASE_CONFIG))
    p.add_argument("--variants", nargs="+", default=["quickstart"], choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--every", type=int, default=50, help="iterations between evaluated checkpoints")
    p.add_argument("--iterations", type=int, default=None, help="stop here (default: the recipe's end)")
    p.add_argument("--protocol", choices=("val", "test"), default="val")
    p.add_argument("--workdir", required=True, help="the runs and their checkpoints go here")
    p.add_argument("--json", required=True)
    p.add_argument("--png", default=None, help="the curves (default: next to --json)")
    p.add_argument("--resume", action="store_true", help="keep the runs already in --json")
    p.add_argument("overrides", nargs="*", default=[], help="extra key=value overrides for every run")
    args = p.parse_args(argv)
    FashionMNIST("test")  # fails early with the install hint
    results = []
    if args.resume and Path(args.json).exists():
        results = json.loads(Path(args.json).read_text())["runs"]
    raw = raw_pixel_knn(args.protocol)

    def save() -> None:
        record = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "protocol": args.protocol,
            "config": str(Path(args.config).resolve().relative_to(REPO))
            if Path(args.config).resolve().is_relative_to(REPO)
            else args.config,
            "overrides": args.overrides,
            "variants": {v: VARIANTS[v] for v in args.variants},
            "raw_pixels_knn20": raw,
            "runs": results,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(args.json)

    done = {(r["variant"], r["seed"]) for r in results}
    for seed in args.seeds:
        for variant in args.variants:
            if (variant, seed) not in done:
                results.append(run_one(variant, seed, args, Path(args.workdir)))
                save()
    wanted = [r for r in results if r["variant"] in args.variants and r["seed"] in args.seeds]
    print(table(wanted, raw))
    curves_png(
        wanted, raw, Path(args.png) if args.png else Path(args.json).with_suffix(".png"), args.protocol
    )
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
