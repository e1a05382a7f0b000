"""Deterministic seeds derived from named parts.

Every random draw in dino_bridge comes from a generator seeded by ``derive_seed(seed, ...)`` with the
parts that identify it (rank, stream position, iteration), so a run is reproducible, resumes
exactly, and does not depend on the number of DataLoader workers.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (stable across processes and Python runs)."""
    text = ":".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def generator(*parts: int | str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``derive_seed(*parts)``."""
    return torch.Generator().manual_seed(derive_seed(*parts))
