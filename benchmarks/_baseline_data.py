"""The reference data pipeline that ``bench_data.py`` compares against: what DINOv2 / DINOv3 and
the reference fork do, written here from their description (not copied).

Per image: PIL decode (``Image.open(path).convert("RGB")``, or ``Image.fromarray`` of an HDF5 tile),
then one ``torchvision.transforms`` (v1, on PIL images) ``Compose`` per view:

    global 1: RandomResizedCrop(G, scale_g, bicubic) [+ flip] → ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8
              → RandomGrayscale p=0.2 → GaussianBlur(9, σ∈[0.1, 2]) p=1.0 → ToTensor → Normalize
    global 2: the same with blur p=0.1, then RandomSolarize(128) p=0.2
    local ×n: RandomResizedCrop(L, scale_l, bicubic) [+ flip] → jitter → grayscale → blur p=0.5 → …

(the flip is there when the recipe has ``crops.horizontal_flips``, as in ours). The collate stacks
the crops crop-major and draws block-wise iBOT masks for half of the global crops with ratios spread
over [0.1, 0.5] (DINOv2's ``collate_data_and_cast`` + ``MaskingGenerator``), with the flat mask
indices and per-patch weights the loss uses. Randomness is the global RNG, as there.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

JITTER = (0.4, 0.4, 0.2, 0.1)


def _view(size: int, scale, flip: bool, blur_p: float, solarize_p: float, mean, std) -> transforms.Compose:
    ops = [
        transforms.RandomResizedCrop(size, scale=scale, interpolation=transforms.InterpolationMode.BICUBIC)
    ]
    if flip:
        ops.append(transforms.RandomHorizontalFlip(p=0.5))
    ops += [
        transforms.RandomApply([transforms.ColorJitter(*JITTER)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([transforms.GaussianBlur(9, sigma=(0.1, 2.0))], p=blur_p),
    ]
    if solarize_p > 0:
        ops.append(transforms.RandomSolarize(threshold=128, p=solarize_p))
    ops += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(ops)


class BaselineMultiCrop:
    def __init__(self, *, global_size, local_size, local_number, global_scale, local_scale, flip, mean, std):
        self.global1 = _view(global_size, global_scale, flip, 1.0, 0.0, mean, std)
        self.global2 = _view(global_size, global_scale, flip, 0.1, 0.2, mean, std)
        self.local = _view(local_size, local_scale, flip, 0.5, 0.0, mean, std)
        self.local_number = local_number

    def __call__(self, image: Image.Image) -> dict:
        return {
            "global_crops": [self.global1(image), self.global2(image)],
            "local_crops": [self.local(image) for _ in range(self.local_number)],
        }


class BaselineDataset(Dataset):
    """JPEG paths (``paths``) or HDF5 tiles (``h5_files`` with ``h5_key``), decoded with PIL."""

    def __init__(self, transform, *, paths=None, h5_files=None, h5_key="patches"):
        self.transform = transform
        self.paths = paths
        self.h5_key = h5_key
        self.h5_items = []
        self._h5 = {}
        if h5_files is not None:
            import h5py

            for path in h5_files:
                with h5py.File(path, "r") as handle:
                    self.h5_items += [(path, k) for k in range(handle[h5_key].shape[0])]

    def __len__(self) -> int:
        return len(self.paths) if self.paths is not None else len(self.h5_items)

    def _image(self, index: int) -> Image.Image:
        if self.paths is not None:
            return Image.open(self.paths[index]).convert("RGB")
        import h5py

        path, tile = self.h5_items[index]
        if path not in self._h5:  # opened lazily, in the worker
            self._h5[path] = h5py.File(path, "r")
        return Image.fromarray(self._h5[path][self.h5_key][tile])

    def __getitem__(self, index: int) -> dict:
        return self.transform(self._image(index))


class BlockMaskGenerator:
    """Block-wise masks on an R×C grid: rectangles of log-uniform aspect in [0.3, 1/0.3] and area in
    [min_patches, budget] are added at random places until the target count is reached."""

    def __init__(self, grid: tuple[int, int], min_patches: int = 4, max_patches: int | None = None):
        self.rows, self.cols = grid
        self.min_patches = min_patches
        self.max_patches = max_patches or int(0.5 * self.rows * self.cols)
        self.log_aspect = (math.log(0.3), math.log(1 / 0.3))

    def _add_block(self, mask: np.ndarray, budget: int) -> int:
        for _ in range(10):
            area = random.uniform(self.min_patches, budget)
            aspect = math.exp(random.uniform(*self.log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if 0 < h < self.rows and 0 < w < self.cols:
                top, left = random.randint(0, self.rows - h), random.randint(0, self.cols - w)
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= budget:
                    block[:] = True
                    return new
        return 0

    def __call__(self, target: int) -> np.ndarray:
        mask = np.zeros((self.rows, self.cols), dtype=bool)
        count = 0
        while count < target:
            added = self._add_block(mask, min(target - count, self.max_patches))
            if added == 0:
                break
            count += added
        return mask


class BaselineCollate:
    def __init__(self, grid: tuple[int, int], mask_probability: float = 0.5, ratio=(0.1, 0.5)):
        self.generator = BlockMaskGenerator(grid)
        self.num_patches = grid[0] * grid[1]
        self.mask_probability = mask_probability
        self.ratio = ratio

    def __call__(self, samples: list[dict]) -> dict:
        n_global, n_local = len(samples[0]["global_crops"]), len(samples[0]["local_crops"])
        global_crops = torch.stack([s["global_crops"][k] for k in range(n_global) for s in samples])
        local_crops = torch.stack([s["local_crops"][k] for k in range(n_local) for s in samples])
        n_images = len(global_crops)
        n_masked = int(n_images * self.mask_probability)
        bounds = np.linspace(*self.ratio, n_masked + 1)
        masks = [
            torch.from_numpy(self.generator(int(self.num_patches * random.uniform(bounds[k], bounds[k + 1]))))
            for k in range(n_masked)
        ]
        masks += [torch.zeros(self.generator.rows, self.generator.cols, dtype=torch.bool)] * (
            n_images - n_masked
        )
        random.shuffle(masks)
        masks = torch.stack(masks).flatten(1)
        indices = masks.flatten().nonzero().flatten()
        weights = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
        return {
            "global_crops": global_crops,
            "local_crops": local_crops,
            "masks": masks,
            "mask_indices": indices,
            "mask_weights": weights,
            "batch_size": len(samples),
        }


class InfiniteRandomSampler(torch.utils.data.Sampler):
    """Indices in a new random order each pass, forever (the reference's infinite sampler)."""

    def __init__(self, size: int, seed: int = 0):
        self.size, self.seed = size, seed

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            yield from torch.randperm(self.size, generator=generator).tolist()
