"""Recipes compared on real images: the same short pretraining on Fashion-MNIST per variant.

Variants: the teacher-target strategies (softmax centering, Sinkhorn-Knopp, DTCH with s = γ ∈ {1, 2},
with its full cumulative window or a one-batch window), and the invariance-stream ablation on
DTCH (``--variants base crop_resize patch_roll bridge all_streams``: the seed's peak weights from
iteration 0, bridge gate off). For each variant and each seed, pretrain the quickstart's
small ViT for the same number of iterations at a small batch with K much larger than the batch,
then measure the 20-NN top-1 accuracy of the teacher CLS (Fashion-MNIST test images against a
fixed subset of the train split). The raw-pixel 20-NN on the same split is the floor any useful
encoder should beat. Prints a markdown table (mean ± std over seeds) and writes JSON.

    python benchmarks/quality_fmnist.py              # the recorded benchmark (about an hour on 2 cores)
    python benchmarks/quality_fmnist.py --quick      # a smoke run (tiny budget, one seed)
    python benchmarks/quality_fmnist.py --variants dtch_s1_window sinkhorn --seeds 0
    python benchmarks/quality_fmnist.py --variants base crop_resize patch_roll bridge all_streams
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dino_bridge.config import load_config  # noqa: E402
from dino_bridge.data import FashionMNIST  # noqa: E402
from dino_bridge.eval import eval_transform_for, extract_features, knn_accuracy, load_backbone  # noqa: E402
from dino_bridge.eval.features import subset_indices  # noqa: E402

BASE_CONFIG = REPO / "configs" / "quickstart.yaml"

# name -> overrides of the base config. A one-batch window: history_size 1 < N_g gives C = 1.
VARIANTS = {
    "centering": ["dtch.enabled=false", "train.centering=centering"],
    "sinkhorn": ["dtch.enabled=false", "train.centering=sinkhorn_knopp"],
    "dtch_s1_window": ["dtch.enabled=true", "dtch.temp_scale=1.0"],
    "dtch_s2_window": ["dtch.enabled=true", "dtch.temp_scale=2.0"],
    "dtch_s1_one_batch": [
        "dtch.enabled=true",
        "dtch.temp_scale=1.0",
        "dtch.cls_hist_cache=1",
        "dtch.patch_hist_cache=1",
    ],
    "dtch_s2_one_batch": [
        "dtch.enabled=true",
        "dtch.temp_scale=2.0",
        "dtch.cls_hist_cache=1",
        "dtch.patch_hist_cache=1",
    ],
}


# The invariance streams on the quickstart's 28 px images (patch 7: a 4×4 grid), at the seed's peak
# weights from the first iteration, the bridges never gated (its iBOT gate reads a loss scale that
# depends on K).
_STREAMS = [
    "dtch.enabled=true",
    "MODEL.META_ARCHITECTURE=SSLResizeShuffle",
    "crops.use_resize_shuffle_augmentor=true",
    "resize_shuffle_augmentor.patch_size=7",
    "resize_shuffle_augmentor.bridge_ibot_gate=null",
]
_CROP_RESIZE = ["resize_shuffle_augmentor.resize_paste_loss_weight=0.5"]
_PATCH_ROLL = ["resize_shuffle_augmentor.patch_shuffle_loss_weight=1.0"]
_BRIDGE = [
    "resize_shuffle_augmentor.bridge_global_weight=0.25",
    "resize_shuffle_augmentor.bridge_patchshuffle_weight=0.25",
]
VARIANTS |= {
    "base": [*_STREAMS],
    "crop_resize": [*_STREAMS, *_CROP_RESIZE],
    "patch_roll": [*_STREAMS, *_PATCH_ROLL],
    "bridge": [*_STREAMS, *_BRIDGE],
    "all_streams": [*_STREAMS, *_CROP_RESIZE, *_PATCH_ROLL, *_BRIDGE],
}
TEACHER_TARGETS = [
    "centering",
    "sinkhorn",
    "dtch_s1_window",
    "dtch_s2_window",
    "dtch_s1_one_batch",
    "dtch_s2_one_batch",
]


def budget_overrides(iterations: int, batch: int, prototypes: int) -> list[str]:
    """The common budget: iterations in epochs of 50, the batch, K for both heads, no checkpoints."""
    epoch = 50 if iterations >= 50 else iterations
    return [
        f"train.OFFICIAL_EPOCH_LENGTH={epoch}",
        f"optim.epochs={max(1, iterations // epoch)}",
        f"train.batch_size_per_gpu={batch}",
        f"dino.head_n_prototypes={prototypes}",
        f"ibot.head_n_prototypes={prototypes}",
        f"checkpointing.period={10**9}",
        "train.log_period=50",
    ]


def raw_pixel_knn(limit_train: int, limit_val: int) -> float:
    """20-NN top-1 (%) on L2-normalised raw pixels, same split and weighting as the encoders."""
    train, test = FashionMNIST("train"), FashionMNIST("test")
    train_idx = subset_indices(len(train), limit_train)
    test_idx = subset_indices(len(test), limit_val, seed=1)

    def pixels(source, idx):
        idx = range(len(source)) if idx is None else idx
        images = (np.asarray(source.load(int(i)).convert("L")) for i in idx)
        feats = torch.stack([torch.from_numpy(image.copy()).flatten() for image in images])
        return feats.float(), torch.tensor([source.labels[int(i)] for i in idx])

    train_x, train_y = pixels(train, train_idx)
    test_x, test_y = pixels(test, test_idx)
    return knn_accuracy(train_x, train_y, test_x, test_y, ks=(20,))[20]


def encoder_knn(run_dir: Path, limit_train: int, limit_val: int) -> float:
    model, spec = load_backbone(run_dir)
    transform = eval_transform_for(spec)
    train, test = FashionMNIST("train"), FashionMNIST("test")
    train_x, train_y = extract_features(
        model, train, transform, indices=subset_indices(len(train), limit_train)
    )
    test_x, test_y = extract_features(
        model, test, transform, indices=subset_indices(len(test), limit_val, seed=1)
    )
    return knn_accuracy(train_x, train_y, test_x, test_y, ks=(20,))[20]


def run_one(variant: str, seed: int, args, workdir: Path) -> dict:
    from dino_bridge.distributed.device import setup_runtime
    from dino_bridge.train.loop import train

    overrides = budget_overrides(args.iterations, args.batch, args.prototypes) + VARIANTS[variant]
    overrides += [f"train.seed={seed}", *args.overrides]
    cfg = load_config(BASE_CONFIG, overrides)
    out = workdir / f"{variant}_seed{seed}"
    start = time.perf_counter()
    summary = train(cfg, setup_runtime("cpu"), out, resume=False)
    minutes = (time.perf_counter() - start) / 60
    last = summary["last_record"]
    return {
        "variant": variant,
        "seed": seed,
        "knn20": encoder_knn(out, args.limit_train, args.limit_val),
        "train_minutes": round(minutes, 2),
        "final_total_loss": last.get("total_loss"),
        "final_dino_local_loss": last.get("dino_local_crops_loss"),
    }


def summarise(results: list[dict], variants: list[str]) -> list[dict]:
    rows = []
    for variant in variants:
        scores = [r["knn20"] for r in results if r["variant"] == variant]
        if not scores:
            continue
        std = statistics.stdev(scores) if len(scores) > 1 else None
        rows.append({"variant": variant, "mean": statistics.mean(scores), "std": std, "n": len(scores)})
    return rows


def markdown(rows: list[dict], raw: float, args) -> str:
    lines = [
        f"20-NN top-1 on Fashion-MNIST ({args.limit_val} test vs {args.limit_train} train images), "
        f"{args.iterations} iterations, batch {args.batch}, K = {args.prototypes}, seeds {args.seeds}",
        "",
        "| variant | 20-NN top-1 (%) | runs |",
        "|---|---:|---:|",
    ]
    for row in rows:
        std = "" if row["std"] is None else f" ± {row['std']:.2f}"
        lines.append(f"| {row['variant']} | {row['mean']:.2f}{std} | {row['n']} |")
    lines.append(f"| raw pixels (no training) | {raw:.2f} | – |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prototypes", type=int, default=4096)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=TEACHER_TARGETS, choices=list(VARIANTS))
    p.add_argument("--limit-train", type=int, default=10000)
    p.add_argument("--limit-val", type=int, default=2000)
    p.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--resume", action="store_true", help="keep the runs already in --json, run the rest")
    p.add_argument("--quick", action="store_true", help="a smoke run: 4 iterations, one seed, small kNN")
    p.add_argument("overrides", nargs="*", default=[], help="extra key=value overrides for every run")
    args = p.parse_args(argv)
    if args.quick:
        args.iterations, args.seeds, args.limit_train, args.limit_val = 4, args.seeds[:1], 500, 200
        args.overrides = [*args.overrides, "dtch.cls_hist_cache=256", "dtch.patch_hist_cache=2048"]
    FashionMNIST("test")  # fails early with the install hint

    started = time.perf_counter()
    results = previous_runs(args)

    def save(raw: float | None = None, rows: list[dict] | None = None) -> None:
        """Written after every run, so an interrupted benchmark keeps what it measured."""
        if not args.json:
            return
        record = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "minutes_this_invocation": round((time.perf_counter() - started) / 60, 1),
            "args": {k: v for k, v in vars(args).items() if k not in ("json", "resume")},
            "raw_pixels_knn20": raw,
            "summary": rows,
            "runs": results,
        }
        tmp_path = Path(args.json).with_suffix(".json.tmp")
        tmp_path.write_text(json.dumps(record, indent=2) + "\n")
        tmp_path.replace(args.json)

    done = {(r["variant"], r["seed"]) for r in results}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        for seed in args.seeds:
            for variant in args.variants:
                if (variant, seed) in done:
                    print(f"{variant} seed {seed}: kept from {args.json}", flush=True)
                    continue
                result = run_one(variant, seed, args, workdir)
                results.append(result)
                save()
                print(
                    f"{variant} seed {seed}: 20-NN {result['knn20']:.2f}% ({result['train_minutes']} min)",
                    flush=True,
                )
    raw = raw_pixel_knn(args.limit_train, args.limit_val)
    wanted = [r for r in results if r["seed"] in args.seeds]
    rows = summarise(wanted, args.variants)
    print(markdown(rows, raw, args))
    save(raw, rows)
    return 0


def previous_runs(args) -> list[dict]:
    """With --resume, the runs already in --json measured under the same budget (else none)."""
    if not (args.resume and args.json and Path(args.json).exists()):
        return []
    old = json.loads(Path(args.json).read_text())
    budget = ("iterations", "batch", "prototypes", "limit_train", "limit_val", "overrides")
    mismatched = [k for k in budget if old["args"].get(k) != getattr(args, k)]
    if mismatched:
        raise SystemExit(f"--resume: {args.json} was measured with other {', '.join(mismatched)}")
    return old["runs"]


if __name__ == "__main__":
    sys.exit(main())
