"""File-backed image sources for data at scale: HDF5 tile stores, whole-slide images, tar shards.

Each is an ``ImageSource`` (``data/datasets.py``) in its own module, config-free, and needs an
optional extra: ``[h5]``, ``[wsi]``, ``[shards]``. The modules import their package only when a
source is built, so importing this package never fails.
"""

from dino_bridge.data.sources.common import ItemIndex, MissingExtraError
from dino_bridge.data.sources.h5 import H5TileSource
from dino_bridge.data.sources.shards import ShardSource
from dino_bridge.data.sources.wsi import WSITileSource, build_wsi_index, save_wsi_index

__all__ = [
    "H5TileSource",
    "ItemIndex",
    "MissingExtraError",
    "ShardSource",
    "WSITileSource",
    "build_wsi_index",
    "save_wsi_index",
]
