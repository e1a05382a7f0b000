"""Images per second per CPU core of the data pipeline: ours against the torchvision baseline.

    python benchmarks/bench_data.py                    # JPEG + HDF5, 1, 2 and all workers, 3 repeats
    python benchmarks/bench_data.py --profile          # + a cProfile breakdown of ours (both pipelines)
    python benchmarks/bench_data.py --quick            # a seconds-long smoke run

The view set (``--views full``, the default) is the seed recipe's (configs/dinov3_vitlarge_pretrain.yaml):
2 global crops of 224 and 8 local crops of 96 with their photometric ops, iBOT masks for the global
crops, and the invariance views of the Crop-Resize and PatchRoll streams as the trainer builds them
with both streams on (``invariance_kinds = {raw, resizepaste}``): the two sources r (a global crop's
geometry with fresh photometric ops) and o (the whole image at 224), their normalised raw views, their
ResizePaste views, their roll offsets, and the collate's resize-paste, shift and alignment masks (the
rolled images themselves are made on the device). ``--views core`` leaves the invariance views out.
The baseline has no invariance views (the reference fork's torchvision pipeline has no such views in
its per-view Compose), so "ours (full) ÷ baseline (core)" understates our speed-up.

Data, made at bench time in a temporary folder (never committed): JPEGs of ImageNet-like size
(500×375 or 375×500, quality 90) cut from the real photos shipped in the scikit-image and
scikit-learn wheels (random crops, resizes and flips of them), and HDF5 tiles (uint8 [N, 256, 256, 3],
two uncompressed files) cut the same way.

Pipelines, side by side in one run, alternated (their order flips every repeat):
- baseline: PIL decode + one torchvision-transforms Compose per view, DINOv2-style collate and
  block mask generator (``benchmarks/_baseline_data.py``), an infinite random sampler;
- reference, fast: what the trainer builds (``train.build.build_loader``: SSLTrainDataset +
  MultiCropAugmentation + InvarianceViews + MultiCropCollate + ShardedInfiniteSampler) over
  ``ImageListDataset`` / ``H5TileSource``, with ``crops.view_pipeline`` = reference (torchvision's
  uint8 ops, the default) or fast (``data/fast_ops.py``).

Both use a DataLoader with W worker processes (persistent, prefetch 2) and the same batch size; the
main process only drains it. OMP_NUM_THREADS=1 (and one torch thread) everywhere. Rate: with W
workers the batches arrive in rounds of W; the clock runs from the end of the first round over
``--rounds`` more rounds, so worker start-up is not counted. Per core = images/s ÷ W. The reported
figure is the median over repeats; the ratios are fast ÷ baseline and fast ÷ reference.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported (workers inherit it)

import argparse  # noqa: E402
import cProfile  # noqa: E402
import json  # noqa: E402
import pstats  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from benchmarks._baseline_data import (  # noqa: E402
    BaselineCollate,
    BaselineDataset,
    BaselineMultiCrop,
    InfiniteRandomSampler,
)
from benchmarks._report import environment  # noqa: E402
from dino_bridge.config import load_config  # noqa: E402

SEED_YAML = REPO / "configs" / "dinov3_vitlarge_pretrain.yaml"
TILE_SIZE = 256
PIPELINES = ("baseline", "reference", "fast")
INVARIANCE_KINDS = {"full": frozenset({"raw", "resizepaste"}), "core": frozenset()}


# ------------------------------------------------------------------------------------ the data
def real_photos() -> list[np.ndarray]:
    """The RGB photos shipped inside the scikit-image and scikit-learn wheels (no download)."""
    photos = []
    try:
        import skimage.data as sk

        for name in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field"):
            photos.append(np.asarray(getattr(sk, name)())[..., :3])
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_sample_images

        photos += [np.asarray(p)[..., :3] for p in load_sample_images().images]
    except ImportError:
        pass
    if not photos:
        raise SystemExit(
            "bench_data needs scikit-image or scikit-learn for its photos: pip install 'dino_bridge[bench]'"
        )
    return photos


def _random_cut(photo: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A random crop of ``photo`` with the aspect of ``size`` (W, H), resized to it, maybe flipped."""
    height, width = photo.shape[:2]
    aspect = size[0] / size[1]
    fraction = rng.uniform(0.5, 1.0)
    crop_w = int(min(width, height * aspect) * np.sqrt(fraction))
    crop_h = int(crop_w / aspect)
    top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
    image = Image.fromarray(photo[top : top + crop_h, left : left + crop_w]).resize(size, Image.BICUBIC)
    return image.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


def make_jpegs(folder: Path, count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    photos = real_photos()
    paths = []
    for i in range(count):
        size = (500, 375) if rng.random() < 0.75 else (375, 500)
        path = folder / f"img_{i:05d}.jpg"
        _random_cut(photos[i % len(photos)], size, rng).save(path, quality=90)
        paths.append(str(path))
    (folder / "images.txt").write_text("\n".join(paths) + "\n")
    return paths


def make_h5_tiles(folder: Path, count: int, seed: int = 1) -> list[str]:
    import h5py

    rng = np.random.default_rng(seed)
    photos = real_photos()
    tiles = np.stack(
        [np.asarray(_random_cut(photos[i % len(photos)], (TILE_SIZE, TILE_SIZE), rng)) for i in range(count)]
    )
    files = []
    for k, part in enumerate(np.array_split(tiles, 2)):
        path = folder / f"tiles_{k}.h5"
        with h5py.File(path, "w") as handle:
            handle.create_dataset("patches", data=part)
        files.append(str(path))
    (folder / "tiles.txt").write_text("\n".join(files) + "\n")
    return files


# ---------------------------------------------------------------------------------- pipelines
def recipe(batch_size: int, workers: int, view_pipeline: str = "reference"):
    return load_config(
        SEED_YAML,
        [
            f"train.batch_size_per_gpu={batch_size}",
            f"train.num_workers={workers}",
            f"crops.view_pipeline={view_pipeline}",
        ],
    )


def baseline_loader(source: dict, batch_size: int, workers: int) -> DataLoader:
    cfg = recipe(batch_size, workers)
    c = cfg.crops
    transform = BaselineMultiCrop(
        global_size=int(c.global_crops_size),
        local_size=int(c.local_crops_size),
        local_number=int(c.local_crops_number),
        global_scale=tuple(c.global_crops_scale),
        local_scale=tuple(c.local_crops_scale),
        flip=bool(c.horizontal_flips),
        mean=list(c.rgb_mean),
        std=list(c.rgb_std),
    )
    if source["kind"] == "jpeg":
        dataset = BaselineDataset(transform, paths=source["paths"])
    else:
        dataset = BaselineDataset(transform, h5_files=source["files"])
    grid = int(c.global_crops_size) // int(cfg.student.patch_size)
    collate = BaselineCollate(
        (grid, grid), float(cfg.ibot.mask_sample_probability), tuple(cfg.ibot.mask_ratio_min_max)
    )
    options = {"persistent_workers": True, "prefetch_factor": 2} if workers else {}
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=InfiniteRandomSampler(len(dataset)),
        num_workers=workers,
        collate_fn=collate,
        drop_last=True,
        **options,
    )


def our_source(source: dict, index_dir: str):
    from dino_bridge.data import ImageListDataset
    from dino_bridge.data.sources import H5TileSource

    if source["kind"] == "jpeg":
        return ImageListDataset(source["list"])
    return H5TileSource(source["list"], index_dir=index_dir)


def our_loader(
    source: dict, batch_size: int, workers: int, index_dir: str, view_pipeline: str, views: str
) -> DataLoader:
    from dino_bridge.train import build

    cfg = recipe(batch_size, workers, view_pipeline)
    return build.build_loader(
        cfg,
        our_source(source, index_dir),
        rank=0,
        world_size=1,
        start_position=0,
        pin_memory=False,
        invariance_kinds=INVARIANCE_KINDS[views],
    )


# ------------------------------------------------------------------------------------- timing
def measure(loader: DataLoader, workers: int, rounds: int, batch_size: int) -> float:
    """Images per second after the first round of batches (one batch per worker)."""
    per_round = max(1, workers)
    batches = iter(loader)
    for _ in range(per_round):
        next(batches)
    start = time.perf_counter()
    for _ in range(rounds * per_round):
        next(batches)
    elapsed = time.perf_counter() - start
    del batches
    return rounds * per_round * batch_size / elapsed


def run_grid(sources: dict, args, index_dir: str) -> list[dict]:
    makers = {
        "baseline": baseline_loader,
        "reference": lambda s, b, w: our_loader(s, b, w, index_dir, "reference", args.views),
        "fast": lambda s, b, w: our_loader(s, b, w, index_dir, "fast", args.views),
    }
    rows = {}
    for repeat in range(args.repeats):
        for source_name, source in sources.items():
            for workers in args.workers:
                order = list(PIPELINES) if repeat % 2 == 0 else list(reversed(PIPELINES))
                for pipeline in order:
                    loader = makers[pipeline](source, args.batch_size, workers)
                    rate = measure(loader, workers, args.rounds, args.batch_size)
                    del loader
                    rows.setdefault((source_name, workers, pipeline), []).append(rate)
                    print(
                        f"repeat {repeat + 1}/{args.repeats} {source_name:5s} W={workers} {pipeline:9s}"
                        f" {rate:7.1f} img/s ({rate / workers:6.1f} per core)",
                        flush=True,
                    )
    table = []
    for source_name in sources:
        for workers in args.workers:
            rates = {name: rows[(source_name, workers, name)] for name in PIPELINES}
            median = {name: statistics.median(values) for name, values in rates.items()}
            row = {"source": source_name, "workers": workers}
            for name in PIPELINES:
                row[f"{name}_per_core"] = median[name] / workers
                row[f"{name}_img_s"] = rates[name]
            row["fast_vs_baseline"] = median["fast"] / median["baseline"]
            row["fast_vs_reference"] = median["fast"] / median["reference"]
            row["reference_vs_baseline"] = median["reference"] / median["baseline"]
            table.append(row)
    return table


# ---------------------------------------------------------------------------------- profiling
# (stage, function name, file suffix, caller name or None): cumulative time of the function, only
# under that caller when one is given (torchvision functions are also called inside other ops). The
# reference pipeline's functions live in transforms.py (and torchvision), the fast one's in fast_ops.py.
STAGES = [
    ("decode (PIL / HDF5 read)", "load_image", "images.py", None),
    ("decode (PIL / HDF5 read)", "load", "sources/h5.py", None),
    ("to uint8 tensor", "image_to_uint8_tensor", "transforms.py", "__getitem__"),
    ("to uint8 tensor", "image_to_uint8_tensor", "transforms.py", "__call__"),
    ("sample parameters", "sample_params", "transforms.py", None),
    ("sample parameters", "sample_resize_paste", "views.py", None),
    ("sample parameters", "sample_roll", "views.py", None),
    ("resized crop (+flip)", "_geometric", "transforms.py", None),
    ("to float", "to_float", "transforms.py", None),
    ("to float", "to_float", "fast_ops.py", None),
    ("colour jitter", "apply_color_jitter", "transforms.py", None),
    ("colour jitter", "apply_color_jitter", "fast_ops.py", None),
    ("grayscale", "rgb_to_grayscale", "_color.py", "apply_pixel_ops"),
    ("grayscale", "grayscale", "fast_ops.py", "apply_pixel_ops"),
    ("gaussian blur", "gaussian_blur", "_misc.py", "apply_pixel_ops"),
    ("gaussian blur", "gaussian_blur", "fast_ops.py", "apply_pixel_ops"),
    ("solarize", "solarize", "_color.py", "apply_pixel_ops"),
    ("solarize", "solarize_", "fast_ops.py", "apply_pixel_ops"),
    ("normalise (mean/std)", "normalize", "transforms.py", None),
    ("normalise (mean/std)", "normalize", "fast_ops.py", None),
    ("invariance: source o (whole-image resize)", "source_o", "invariance.py", None),
    ("invariance: resize-paste views", "resize_paste", "views.py", None),
    ("stack crops (collate)", "_stack_crop_major", "collate.py", None),
    ("iBOT masks (collate)", "_masks", "collate.py", "__call__"),
    ("iBOT masks (collate)", "of", "collate.py", "__call__"),
    ("invariance: stack + masks (collate)", "_invariance", "collate.py", None),
]
TOTALS = [("__getitem__", "ssl_dataset.py"), ("__call__", "collate.py")]
# inside the colour jitter: the reference's adjust_* ops, and the fast pipeline's hue shift
JITTER_OPS = [
    ("adjust_brightness", "_color.py"),
    ("adjust_contrast", "_color.py"),
    ("adjust_saturation", "_color.py"),
    ("adjust_hue", "_color.py"),
    ("adjust_hue", "fast_ops.py"),
]


def _cumulative(stats: pstats.Stats, name: str, suffix: str, caller: str | None) -> float:
    total = 0.0
    for (filename, _, function), (_, _, _, cumulative, callers) in stats.stats.items():
        if function != name or not filename.endswith(suffix):
            continue
        if caller is None:
            total += cumulative
        else:
            total += sum(v[3] for (_, _, c), v in callers.items() if c == caller)
    return total


def profile_ours(sources: dict, batch_size: int, batches: int, index_dir: str, views: str) -> dict:
    """cProfile of SSLTrainDataset.__getitem__ + MultiCropCollate over ``batches`` batches (one
    process), per view pipeline and source: {"reference/jpeg": …, "fast/jpeg": …, …}."""
    report = {}
    for pipeline, source_name in [(p, s) for p in ("reference", "fast") for s in sources]:
        source = sources[source_name]
        loader = our_loader(source, batch_size, 0, index_dir, pipeline, views)
        dataset, collate = loader.dataset, loader.collate_fn
        items = iter(loader.sampler)
        collate([dataset[next(items)] for _ in range(batch_size)])  # warm-up, not profiled
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.enable()
        for _ in range(batches):
            collate([dataset[next(items)] for _ in range(batch_size)])
        profiler.disable()
        wall = time.perf_counter() - start
        stats = pstats.Stats(profiler)
        total = sum(_cumulative(stats, name, suffix, None) for name, suffix in TOTALS)
        stages: dict[str, float] = {}
        for stage, name, suffix, caller in STAGES:
            stages[stage] = stages.get(stage, 0.0) + _cumulative(stats, name, suffix, caller)
        stages["other (views glue, sampler, Python)"] = total - sum(stages.values())
        jitter = {
            f"{op} ({suffix})": _cumulative(stats, op, suffix, "apply_color_jitter")
            for op, suffix in JITTER_OPS
        }
        jitter = {k: v for k, v in jitter.items() if v > 0}
        report[f"{pipeline}/{source_name}"] = {
            "jitter_ms_per_image": {k: 1000 * v / (batches * batch_size) for k, v in jitter.items()},
            "images": batches * batch_size,
            "wall_s": wall,
            "profiled_s": total,
            "ms_per_image": {k: 1000 * v / (batches * batch_size) for k, v in stages.items()},
            "share": {k: v / total for k, v in stages.items()},
        }
    return report


def print_tables(result: dict) -> None:
    env = result["environment"]
    print(
        f"\ntorch {env['torch']} | {env['cpu']} ({env['cpu_cores']} cores) | {env['date']} | git {env['git']}"
    )
    print(
        f"load average {env['load_avg_1m_at_start']:.2f} at the start"
        " (the machine is shared: absolute figures are noisy)"
    )
    print(f"views: {result['config']['views']}")
    print(
        "\n| source | workers | baseline img/s/core | reference img/s/core | fast img/s/core"
        " | fast ÷ baseline | fast ÷ reference |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in result["table"]:
        print(
            f"| {row['source']} | {row['workers']} | {row['baseline_per_core']:.1f}"
            f" | {row['reference_per_core']:.1f} | {row['fast_per_core']:.1f}"
            f" | {row['fast_vs_baseline']:.2f}× | {row['fast_vs_reference']:.2f}× |"
        )
    for name, prof in result.get("profile", {}).items():
        print(f"\n{name}: cProfile of __getitem__ + collate, {prof['images']} images (one process)")
        print("| stage | ms / image | share |\n|---|---:|---:|")
        for stage, ms in prof["ms_per_image"].items():
            print(f"| {stage} | {ms:.2f} | {100 * prof['share'][stage]:.0f}% |")
        print(f"| total | {1000 * prof['profiled_s'] / prof['images']:.2f} | |")
        detail = ", ".join(f"{op} {ms:.2f}" for op, ms in prof["jitter_ms_per_image"].items())
        print(f"colour jitter, ms / image: {detail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=96, help="JPEGs and HDF5 tiles made for the run")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=4, help="timed rounds of W batches per measurement")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=None, help="default: 1, 2 and all cores")
    p.add_argument("--sources", nargs="+", default=["jpeg", "hdf5"], choices=["jpeg", "hdf5"])
    p.add_argument(
        "--views",
        choices=sorted(INVARIANCE_KINDS),
        default="full",
        help="ours: with or without the invariance views",
    )
    p.add_argument("--profile", action="store_true", help="also a cProfile breakdown of ours")
    p.add_argument("--profile-batches", type=int, default=4)
    p.add_argument("--profile-only", action="store_true", help="only the profile (no throughput grid)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of a few seconds")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.batch_size, args.rounds, args.repeats = 8, 2, 1, 1
        args.workers = args.workers or [1]
        args.profile_batches = 1
    args.workers = sorted(set(args.workers or [1, 2, os.cpu_count() or 1]))
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        root = Path(tmp)
        sources = {}
        if "jpeg" in args.sources:
            (root / "jpeg").mkdir()
            sources["jpeg"] = {"kind": "jpeg", "paths": make_jpegs(root / "jpeg", args.images)}
            sources["jpeg"]["list"] = str(root / "jpeg" / "images.txt")
        if "hdf5" in args.sources:
            (root / "hdf5").mkdir()
            sources["hdf5"] = {"kind": "hdf5", "files": make_h5_tiles(root / "hdf5", args.images)}
            sources["hdf5"]["list"] = str(root / "hdf5" / "tiles.txt")
        result = {
            "environment": environment(torch.device("cpu"), 1, load_before),
            "config": {
                "recipe": "configs/dinov3_vitlarge_pretrain.yaml",
                "views": (
                    "baseline: 2×224 + 8×96 crops, iBOT masks; reference and fast: the same"
                    + (
                        " + the invariance views (raw and resize-paste of sources r and o, roll"
                        " offsets, resize-paste / shift / alignment masks)"
                        if args.views == "full"
                        else " (invariance views not included)"
                    )
                ),
                "images": args.images,
                "batch_size": args.batch_size,
                "rounds": args.rounds,
                "repeats": args.repeats,
                "workers": args.workers,
                "jpeg_size": "500×375 / 375×500, quality 90",
                "hdf5_tile": f"{TILE_SIZE}×{TILE_SIZE}",
            },
            "table": [] if args.profile_only else run_grid(sources, args, str(root / "index")),
        }
        if args.profile or args.profile_only:
            result["profile"] = profile_ours(
                sources, args.batch_size, args.profile_batches, str(root / "index"), args.views
            )
    print_tables(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
