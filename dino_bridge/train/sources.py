"""One ``data.<name>`` entry of the config as an image source (the trainer and ``dino-bridge data``).

The sources with an index (``h5_list``, ``shards``) count their items on the first rank only: it
builds or refreshes the index, the others wait at a barrier and then open it. Files left out of an
index (unreadable when it was built) are logged once per run, with the reason.
"""

from __future__ import annotations

import logging

from ..data import ImageFolderDataset, ImageListDataset, ImageSource, build_demo_dataset
from ..data.sources import H5TileSource, ShardSource, WSITileSource
from ..distributed import dist

logger = logging.getLogger("dino_bridge")

SOURCE_KEYS = ("txt_path", "root", "demo", "h5_list", "wsi_index", "shards")


def _indexed(make, index_dir: str | None):
    """``make(index_dir=..., build_index=...)`` with the index built by the first rank only; a failure
    there fails every rank with the same message."""
    if dist.get_world_size() == 1:
        return make(index_dir=index_dir, build_index=True)
    problem = None
    if dist.is_main_process():
        try:
            make(index_dir=index_dir, build_index=True)
        except (ValueError, OSError) as e:
            problem = str(e)
    problem = dist.broadcast_object(problem)  # also the barrier: the index is on disk from here
    if problem is not None:
        raise ValueError(problem)
    return make(index_dir=index_dir, build_index=False)


def open_source(name: str, src, index_dir: str | None = None, jpeg_draft_min_side: int = 0) -> ImageSource:
    """The source of ``src`` (a ``DataSourceConfig`` node); ``index_dir``: where an index goes when the
    data's own folder is read-only (the run's output dir); ``jpeg_draft_min_side`` > 0: reduced-size
    JPEG decoding for the sources of image files (``crops.jpeg_draft_min_side``)."""
    if src.txt_path:
        return ImageListDataset(src.txt_path, draft_min_side=jpeg_draft_min_side)
    if src.root:
        return ImageFolderDataset(src.root, draft_min_side=jpeg_draft_min_side)
    if src.demo:
        return build_demo_dataset(src.demo, "train")
    if src.h5_list:
        key = str(src.h5_key)
        source = _indexed(lambda **kw: H5TileSource(src.h5_list, h5_key=key, **kw), index_dir)
    elif src.wsi_index:
        return WSITileSource(src.wsi_index)
    elif src.shards:
        source = _indexed(
            lambda **kw: ShardSource(src.shards, draft_min_side=jpeg_draft_min_side, **kw), index_dir
        )
    else:
        raise ValueError(f"needs one of {', '.join(SOURCE_KEYS)}")
    for path, reason in source.unreadable.items():
        logger.warning("data.%s: %s is left out (unreadable when indexed): %s", name, path, reason)
    return source
