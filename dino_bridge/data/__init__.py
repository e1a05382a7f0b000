"""Data pipeline: image sources, multi-crop views, iBOT masks, collate, sampler and loader."""

from dino_bridge.data.collate import MultiCropCollate
from dino_bridge.data.datasets import (
    DEMO_DATASETS,
    FASHION_MNIST_CLASSES,
    ConcatImageDataset,
    FashionMNIST,
    ImageFolderDataset,
    ImageListDataset,
    ImageSource,
    SubsetDataset,
    build_demo_dataset,
)
from dino_bridge.data.images import IMAGE_EXTENSIONS, ImageLoadError, load_image
from dino_bridge.data.loader import build_train_loader
from dino_bridge.data.masking import MaskingGenerator, num_masked_patches_per_image, sample_ibot_masks
from dino_bridge.data.sampler import ShardedInfiniteSampler
from dino_bridge.data.ssl_dataset import SSLTrainDataset
from dino_bridge.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    MultiCropAugmentation,
    MultiCropParams,
    ViewParams,
)

__all__ = [
    "DEMO_DATASETS",
    "FASHION_MNIST_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ConcatImageDataset",
    "EvalTransform",
    "FashionMNIST",
    "ImageFolderDataset",
    "ImageListDataset",
    "ImageLoadError",
    "ImageSource",
    "MaskingGenerator",
    "MultiCropAugmentation",
    "MultiCropCollate",
    "MultiCropParams",
    "SSLTrainDataset",
    "ShardedInfiniteSampler",
    "SubsetDataset",
    "ViewParams",
    "build_demo_dataset",
    "build_train_loader",
    "load_image",
    "num_masked_patches_per_image",
    "sample_ibot_masks",
]
