"""What the file-backed sources share: optional packages, a per-process cache of open files, and
an index of (file, item) rows built once and checked against each file's size and mtime.

Shapes: F files, T items (tiles, samples) over all files.

The index file (``ItemIndex``) is one binary file: a magic line, the length of a JSON header, the
header (its kind, and per file: path, size, mtime_ns, item count, error or null), padding to 64
bytes, then int32 [T, 2] rows (file number, item within the file). The rows are memory-mapped, so
DataLoader workers share one copy through the page cache. It is written atomically (a temporary file
in the same folder, then a rename); it is up to date when it lists the same files in the same order,
with the same size and mtime, for the same kind. A rebuild recounts only the files that changed.
A file that cannot be counted (not readable, wrong layout) is kept with 0 items and its reason, so
it is reported each time the index is opened and recounted once it changes.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from dino_bridge.data.images import ImageLoadError

_MAGIC = b"DINO_BRIDGE_ITEM_INDEX 1\n"
_ALIGN = 64


class MissingExtraError(ValueError):
    """An optional package that a source needs is not installed (the message names the extra)."""


def require(module: str, extra: str, what: str) -> ModuleType:
    """``import module``, or a ``MissingExtraError`` saying ``pip install 'dino_bridge[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f"{what} needs the Python package {module!r}, which is not installed: "
            f"pip install 'dino_bridge[{extra}]'"
        ) from None


def read_path_list(txt_path: str | os.PathLike, what: str) -> list[str]:
    """The paths listed in a text file (one per line; blanks and ``#`` lines skipped), relative
    ones resolved against the file's folder."""
    txt_path = os.fspath(txt_path)
    if not os.path.isfile(txt_path):
        raise ValueError(f"{what} list {txt_path!r} does not exist (or is not a file)")
    base = os.path.dirname(os.path.abspath(txt_path))
    with open(txt_path, encoding="utf-8") as handle:
        entries = [line.strip() for line in handle]
    paths = [os.path.normpath(os.path.join(base, e)) for e in entries if e and not e.startswith("#")]
    if not paths:
        raise ValueError(f"{what} list {txt_path!r} lists no files (only blanks/comments)")
    return paths


def fingerprint(path: str) -> tuple[int, int] | None:
    """(size, mtime_ns) of ``path``, None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


class OpenFiles:
    """Open handles of this process, the least recently used closed beyond ``capacity``.

    A file that fails to open is remembered with its reason and not tried again (the outcome would be
    the same); every item of it then fails with an ``ImageLoadError`` naming the file. The cache is
    emptied in a new process (a forked DataLoader worker opens its own handles) and not pickled.
    """

    def __init__(self, opener: Callable[[str], Any], capacity: int = 8) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.opener = opener
        self.capacity = int(capacity)
        self.failed: dict[str, str] = {}  # path -> why it could not be opened
        self._handles: OrderedDict[str, Any] = OrderedDict()
        self._pid = os.getpid()

    def get(self, path: str) -> Any:
        if self._pid != os.getpid():  # inherited from the parent: never use (nor close) its handles
            self._handles, self._pid = OrderedDict(), os.getpid()
        if path in self.failed:
            raise ImageLoadError(path, self.failed[path])
        handle = self._handles.get(path)
        if handle is not None:
            self._handles.move_to_end(path)
            return handle
        try:
            handle = self.opener(path)
        except Exception as error:  # any failure of a format library to open one file
            self.failed[path] = f"cannot open: {type(error).__name__}: {error}"
            raise ImageLoadError(path, self.failed[path]) from error
        self._handles[path] = handle
        while len(self._handles) > self.capacity:
            _, oldest = self._handles.popitem(last=False)
            oldest.close()
        return handle

    def __len__(self) -> int:
        return len(self._handles) if self._pid == os.getpid() else 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": OrderedDict()}


# ------------------------------------------------------------------------------------ the index
@dataclass
class FileEntry:
    path: str
    size: int | None
    mtime_ns: int | None
    count: int
    error: str | None


class ItemIndex:
    """(file, item) rows over ``files``: ``len``, ``locate(i) -> (path, item)``, ``unreadable``."""

    def __init__(self, kind: str, files: list[FileEntry], rows: np.ndarray, path: str | None) -> None:
        self.kind = kind
        self.files = files
        self.rows = rows  # int32 [T, 2], memory-mapped when read from disk
        self.path = path  # where it lives (None: built in memory only)

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def locate(self, index: int) -> tuple[str, int]:
        file_number, item = self.rows[index]
        return self.files[int(file_number)].path, int(item)

    @property
    def unreadable(self) -> dict[str, str]:
        """Files left out because they could not be counted: path -> reason."""
        return {f.path: f.error for f in self.files if f.error is not None}

    def counts(self) -> dict[str, int]:
        return {f.path: f.count for f in self.files}


def _rows_for(files: Sequence[FileEntry]) -> np.ndarray:
    parts = [
        np.stack([np.full(f.count, k, dtype=np.int32), np.arange(f.count, dtype=np.int32)], axis=1)
        for k, f in enumerate(files)
        if f.count > 0
    ]
    return np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.int32)


def _encode(kind: str, files: Sequence[FileEntry], rows: np.ndarray) -> bytes:
    header = json.dumps(
        {"kind": kind, "rows": int(rows.shape[0]), "files": [list(vars(f).values()) for f in files]}
    ).encode()
    start = len(_MAGIC) + 8 + len(header)
    padding = (-start) % _ALIGN
    return b"".join(
        [_MAGIC, len(header).to_bytes(8, "little"), header, b"\0" * padding, rows.astype("<i4").tobytes()]
    )


def read_index(path: str) -> ItemIndex | None:
    """The index stored at ``path``, or None when it is absent or unreadable."""
    try:
        with open(path, "rb") as handle:
            if handle.read(len(_MAGIC)) != _MAGIC:
                return None
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length))
        start = len(_MAGIC) + 8 + length
        start += (-start) % _ALIGN
        files = [FileEntry(*entry) for entry in header["files"]]
        num_rows = int(header["rows"])
        if os.path.getsize(path) != start + 8 * num_rows or num_rows != sum(f.count for f in files):
            return None
        rows = (
            np.memmap(path, dtype="<i4", mode="r", offset=start, shape=(num_rows, 2))
            if num_rows
            else np.zeros((0, 2), dtype=np.int32)
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return ItemIndex(str(header["kind"]), files, rows, path)


def is_current(index: ItemIndex | None, kind: str, paths: Sequence[str]) -> bool:
    """``index`` is of ``kind`` and lists ``paths`` in order, each with its current size and mtime."""
    if index is None or index.kind != kind or [f.path for f in index.files] != list(paths):
        return False
    return all(
        fingerprint(f.path) == ((f.size, f.mtime_ns) if f.size is not None else None) for f in index.files
    )


def writable_dir(folder: str) -> bool:
    """Whether a file can be created in ``folder`` (tried, not guessed from permission bits)."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            return True
    except OSError:
        return False


def write_atomic(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def find_index(kind: str, paths: Sequence[str], locations: Sequence[str]) -> ItemIndex | None:
    """The first up-to-date index among ``locations``."""
    for location in locations:
        index = read_index(location)
        if is_current(index, kind, paths):
            return index
    return None


def build_index(
    kind: str,
    paths: Sequence[str],
    count_items: Callable[[str], int],
    locations: Sequence[str],
) -> ItemIndex:
    """Count the items of every file (reusing the counts of unchanged files from a stale index at one
    of ``locations``) and write the index to the first location whose folder is writable."""
    previous: dict[str, FileEntry] = {}
    for location in locations:
        old = read_index(location)
        if old is not None and old.kind == kind:
            previous.update({f.path: f for f in old.files})
    entries = []
    for path in paths:
        stamp = fingerprint(path)
        old = previous.get(path)
        if old is not None and old.size is not None and stamp == (old.size, old.mtime_ns):
            entries.append(old)
        elif stamp is None:
            entries.append(FileEntry(path, None, None, 0, "file does not exist (or cannot be read)"))
        else:
            try:
                count, error = int(count_items(path)), None
            except Exception as e:  # the file's format library failing on a corrupt file
                count, error = 0, f"{type(e).__name__}: {e}"
            entries.append(FileEntry(path, stamp[0], stamp[1], count, error))
    rows = _rows_for(entries)
    for location in locations:
        folder = os.path.dirname(os.path.abspath(location))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError:
            continue
        if writable_dir(folder):
            write_atomic(location, _encode(kind, entries, rows))
            return read_index(location) or ItemIndex(kind, entries, rows, location)
    raise ValueError(f"cannot write the index: none of the folders of {', '.join(locations)} is writable")


def ensure_index(
    kind: str,
    paths: Sequence[str],
    count_items: Callable[[str], int],
    locations: Sequence[str],
    build: bool,
) -> ItemIndex:
    """An up-to-date index: found at one of ``locations``, or (``build``) built and written."""
    index = find_index(kind, paths, locations)
    if index is not None:
        return index
    if not build:
        raise ValueError(
            f"no up-to-date index at {' or '.join(locations)} (it is built by the first rank; did it fail?)"
        )
    return build_index(kind, paths, count_items, locations)


class IndexedFiles:
    """What the sources over many indexed files share: their length and the files left out of
    the index. ``self.index`` is the source's ``ItemIndex``."""

    index: ItemIndex

    def require_items(self, holder: str, items: str) -> None:
        """A clear error when no file contributed an item, naming why each was left out."""
        if len(self.index) == 0:
            problems = "; ".join(f"{p} ({why})" for p, why in self.index.unreadable.items())
            raise ValueError(f"{holder} hold no {items}" + (f": {problems}" if problems else ""))

    @property
    def unreadable(self) -> dict[str, str]:
        """Files left out of the index: path -> reason."""
        return self.index.unreadable

    def __len__(self) -> int:
        return len(self.index)


def index_locations(beside: str, suffix: str, fallback_dir: str | None) -> list[str]:
    """Where an index lives: next to ``beside`` (``<beside><suffix>``), else in ``fallback_dir``
    (the run's output dir, in ``data_index/``) under ``beside``'s name and a hash of its full path."""
    beside = os.path.abspath(beside)
    locations = [beside + suffix]
    if fallback_dir:
        digest = hashlib.sha1(beside.encode()).hexdigest()[:12]
        name = f"{os.path.basename(beside)}.{digest}{suffix}"
        locations.append(os.path.join(os.path.abspath(fallback_dir), "data_index", name))
    return locations
