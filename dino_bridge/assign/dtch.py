"""DTCH-SK teacher targets: the module that holds the cumulative-history window.

Legend: N rows of this rank, N_g rows over all ranks, K prototypes, C window rows (capacity).

The math is in ``dtch_math.py``. This module keeps the sliding window of the last
C = max(1, history_size // N_g) global column masses S, identical on every rank (S is summed over
ranks before it is pushed), so W ranks with N rows each get the targets of one rank with the W·N
rows concatenated, up to the fp32 summation order of S (see ``tests/dist/test_dtch_dist.py``).

State (``state_dict``): the window [C, K] fp32 and two argmax rings [C, N_g] (diagnostics) as
buffers, which ``load_state_dict`` resizes so a fresh module can load them; position, number of
pushes since the last (re)initialisation and N_g as extra state. All of it is world-size
independent. The window is re-initialised, with a logged warning, when N_g (or the capacity)
changes.

The window stores fp32 rows: at K = 65 536 and C = 312 (DINO CLS, 40 000 rows of history at
N_g = 128) that is 82 MB per instance instead of 164 MB in fp64 (×2 again for the auxiliary CLS
streams with C = 625). Rounding S to fp32 costs ≤ 6e-8 relative, below the fp32 noise of S itself.

h is the fp64 sum of the stored rows, never a running add-new/subtract-old total (that drifts).
It is summed by blocks of ⌈√C⌉ rows: a block's fp64 sum is recomputed from its stored rows
whenever one of them changes (the pushed slot: one block per call), and h = Σ block sums. Each
block sum is a deterministic function of its rows, so h cannot drift, equals the flat fp64 sum up
to fp64 rounding, and is bit-identical after a resume (which rebuilds every block).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from dino_bridge.assign.base import TeacherAssigner
from dino_bridge.assign.dtch_math import (
    LOGIT_LOWER,
    MASS_FLOOR,
    accumulation_dtype,
    balance_log_weights,
    balanced_targets_,
    boost_factors,
    soft_logits,
    window_block_rows,
)
from dino_bridge.distributed import dist

logger = logging.getLogger("dino_bridge.assign.dtch")

# The argmax indices travel in one fp32 all-gather together with the row entropies; fp32 holds
# integers exactly up to 2^24.
_MAX_PROTOTYPES = 1 << 24
# exp(c) must stay far inside fp32: row sums of b⊙E reach K·w_max·e^c.
_MAX_LOGIT_CLAMP = 60.0
_STATE_VERSION = 1


@dataclass
class _UndoRecord:
    """What ``restore`` needs to undo one call: scalars, tensor references, one slot per buffer."""

    num_calls: int
    position: int
    pushes: int
    global_rows: int
    buffers: dict[str, torch.Tensor]  # references: a (re)initialisation allocates new tensors
    slots: dict[str, torch.Tensor] | None  # clones of the rows at ``position``; None before init
    last_call: dict[str, torch.Tensor] | None


class DTCH(TeacherAssigner):
    """Dual-Temperature Cumulative History targets (``spec/METHOD.md`` §3).

    ``probs = dtch(logits, teacher_temp)``: logits [N, K] -> probs [N, K] fp32, rows sum to 1.
    ``history_size`` counts global rows; ``exp_power=None`` means ``exp_power = temp_scale``.
    Every rank must make the same calls in the same order (one all-reduce and one all-gather
    per call). ``name`` (the target kind it serves) appears in its errors; a call with zero rows on
    every rank is one.

    For the trainer: ``capacity`` (C, None before the first call) and ``history_full`` drive the
    warm-up (no-grad teacher passes until full); ``snapshot()``/``restore(record)`` undo one call
    (a skipped step) exactly, copying one row per buffer; ``reset_history()``; ``diagnostics()``.

    Passes over N×K per call: argmax(Z), Z/(T·s), clamp, exp, column sum, ×b, row sum, floor,
    ×w, row sum, ÷ (+ pow, row sum, ÷ when γ ≠ 1), and for the diagnostics entr, row sum,
    argmax(q): 14 (17), against 32 for 3 Sinkhorn iterations in log space (``sinkhorn.py``).
    Plus ⌈√C⌉ window rows and ⌈C/⌈√C⌉⌉ block sums, and O(K) fp64 work.
    """

    _WINDOW_BUFFERS = ("history_window", "soft_argmax_window", "sharp_argmax_window")

    def __init__(
        self,
        num_prototypes: int,
        history_size: int,
        *,
        temp_scale: float = 1.0,
        exp_power: float | None = None,
        balance_beta: float = 1.0,
        boost_enabled: bool = True,
        boost_alpha: float = 0.3,
        boost_w_max: float = 50.0,
        boost_divisor: float = 500.0,
        boost_eps: float = 1e-6,
        logit_clamp: float = 30.0,
        name: str = "dtch",
    ) -> None:
        super().__init__()
        self.name = str(name)
        exp_power = temp_scale if exp_power is None else exp_power
        checks = {
            "num_prototypes": (num_prototypes, 1 <= num_prototypes <= _MAX_PROTOTYPES, "in [1, 2^24]"),
            "history_size": (history_size, history_size >= 1, ">= 1"),
            "temp_scale": (temp_scale, temp_scale > 0, "> 0"),
            "exp_power": (exp_power, exp_power > 0, "> 0"),
            "balance_beta": (balance_beta, math.isfinite(balance_beta), "finite"),
            "boost_alpha": (boost_alpha, boost_alpha > 0, "> 0"),
            "boost_w_max": (boost_w_max, boost_w_max >= 1, ">= 1"),
            "boost_divisor": (boost_divisor, boost_divisor > 0, "> 0"),
            "boost_eps": (boost_eps, boost_eps >= 0, ">= 0"),
            "logit_clamp": (
                logit_clamp,
                LOGIT_LOWER < logit_clamp <= _MAX_LOGIT_CLAMP,
                f"in ({LOGIT_LOWER:g}, {_MAX_LOGIT_CLAMP:g}]",
            ),
        }
        for name, (value, ok, rule) in checks.items():
            if not ok:
                raise ValueError(f"DTCH: {name}={value!r} must be {rule}")
        self.num_prototypes = int(num_prototypes)
        self.history_size = int(history_size)
        self.temp_scale = float(temp_scale)
        self.exp_power = float(exp_power)
        self.balance_beta = float(balance_beta)
        self.boost_enabled = bool(boost_enabled)
        self.boost_alpha = float(boost_alpha)
        self.boost_w_max = float(boost_w_max)
        self.boost_divisor = float(boost_divisor)
        self.boost_eps = float(boost_eps)
        self.logit_clamp = float(logit_clamp)

        self.register_buffer("history_window", torch.zeros(0, self.num_prototypes))
        self.register_buffer("soft_argmax_window", torch.zeros(0, 0, dtype=torch.long))
        self.register_buffer("sharp_argmax_window", torch.zeros(0, 0, dtype=torch.long))
        self._position = 0  # the slot the next push overwrites
        self._pushes = 0  # pushes since the last (re)initialisation
        self._global_rows = 0  # N_g of the window; 0 = not initialised
        self._num_calls = 0  # calls ever made (not state: guards ``restore``)
        self._last_call: dict[str, torch.Tensor] | None = None  # 0-dim tensors, no host sync
        self._block_sums: torch.Tensor | None = None  # derived from the window; None = rebuild
        self._dirty_blocks: set[int] = set()
        # The mean row entropy of q costs about two passes over N×K: the trainer turns it on only
        # for the calls whose diagnostics it logs. Off, ``target_entropy`` reads NaN.
        self.collect_target_entropy = True

    # ------------------------------------------------------------------ public state queries

    @property
    def capacity(self) -> int | None:
        """Window rows C = max(1, history_size // N_g); None before the first call."""
        return self.history_window.shape[0] if self._global_rows else None

    @property
    def history_full(self) -> bool:
        """True once C pushes were made since the last (re)initialisation."""
        return bool(self._global_rows) and self._pushes >= self.history_window.shape[0]

    def reset_history(self) -> None:
        """Forget the window; the next call initialises it from its own batch."""
        k = self.num_prototypes
        device = self.history_window.device
        self.history_window = torch.zeros(0, k, device=device)
        self.soft_argmax_window = torch.zeros(0, 0, dtype=torch.long, device=device)
        self.sharp_argmax_window = torch.zeros(0, 0, dtype=torch.long, device=device)
        self._position = self._pushes = self._global_rows = 0
        self._last_call = None
        self._block_sums = None

    # ------------------------------------------------------------------------------ forward

    @torch.no_grad()
    def forward(self, logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[1] != self.num_prototypes:
            raise ValueError(f"DTCH expects logits [N, {self.num_prototypes}], got {tuple(logits.shape)}")
        teacher_temp = float(teacher_temp)
        if not teacher_temp > 0:
            raise ValueError(f"DTCH: teacher_temp={teacher_temp!r} must be > 0")
        num_rows, k = logits.shape
        soft_argmax = logits.argmax(1) if num_rows else logits.new_zeros(0, dtype=torch.long)

        exp_soft = soft_logits(logits, teacher_temp, self.temp_scale, self.logit_clamp).exp_()
        # One collective carries the column mass and the row count (exact in fp32 below 2^24).
        mass = torch.cat([exp_soft.sum(0), exp_soft.new_full((1,), float(num_rows))])
        dist.all_reduce_(mass, "sum")
        global_rows = num_rows if dist.get_world_size() == 1 else round(mass[k].item())
        if global_rows == 0:  # the same on every rank: a caller that planned no rows is a bug
            raise ValueError(
                f"DTCH {self.name}: called with zero rows on every rank (no targets to balance); "
                "the term that needs it would be silently empty"
            )

        self._num_calls += 1
        slot, initialising = self._push(mass[:k].clamp_min_(MASS_FLOOR), global_rows)
        history = self._history()
        if self.boost_enabled:
            boost, rare = boost_factors(
                history,
                alpha=self.boost_alpha,
                w_max=self.boost_w_max,
                divisor=self.boost_divisor,
                eps=self.boost_eps,
            )
        else:
            boost, rare = torch.ones_like(history), torch.zeros_like(history, dtype=torch.bool)
        log_weight = balance_log_weights(history, self.balance_beta)
        q = balanced_targets_(exp_soft, boost, log_weight, self.exp_power)

        self._record_diagnostics(soft_argmax, q, rare, slot, initialising)
        return q

    def _push(self, column_mass: torch.Tensor, global_rows: int) -> tuple[int, bool]:
        """Push S into the window (initialising it if needed); returns (slot written, initialised)."""
        capacity = max(1, self.history_size // global_rows)
        stale = self._global_rows != global_rows or self.history_window.shape[0] != capacity
        if stale:
            if self._global_rows:
                logger.warning(
                    "DTCH history window re-initialised: global rows per call %d -> %d, "
                    "capacity %d -> %d (history_size=%d)",
                    self._global_rows,
                    global_rows,
                    self.history_window.shape[0],
                    capacity,
                    self.history_size,
                )
            # A new tensor, never a write into the old one: ``restore`` relies on it. The empty
            # slots hold copies of this first push.
            self.history_window = column_mass.expand(capacity, -1).clone()
            self._global_rows, self._pushes, self._position = global_rows, 0, 0
            self._block_sums = None
        else:
            if self.history_window.device != column_mass.device:  # e.g. loaded on CPU
                for name in self._WINDOW_BUFFERS:
                    setattr(self, name, getattr(self, name).to(column_mass.device))
                self._block_sums = None
            self.history_window[self._position].copy_(column_mass)
            self._dirty_blocks.add(self._position // window_block_rows(capacity))
        slot = self._position
        self._position = (self._position + 1) % capacity
        self._pushes += 1
        return slot, stale

    def _history(self) -> torch.Tensor:
        """h [K] = Σ of the window rows in fp64 (fp32 on MPS), by blocks (see the module doc)."""
        window = self.history_window
        dtype = accumulation_dtype(window.device)
        block_rows = window_block_rows(window.shape[0])
        num_blocks = -(-window.shape[0] // block_rows)
        shape = (num_blocks, window.shape[1])
        cached = self._block_sums
        if cached is None or cached.shape != shape or cached.device != window.device:
            self._block_sums = window.new_empty(shape, dtype=dtype)
            self._dirty_blocks = set(range(num_blocks))
        for block in sorted(self._dirty_blocks):  # always the same op on the same shape: deterministic
            rows = window[block * block_rows : (block + 1) * block_rows]
            self._block_sums[block] = rows.sum(0, dtype=dtype)
        self._dirty_blocks.clear()
        return self._block_sums.sum(0)

    def _record_diagnostics(
        self, soft_argmax: torch.Tensor, q: torch.Tensor, rare: torch.Tensor, slot: int, initialising: bool
    ) -> None:
        """Global argmax rings aligned with the window, and last-call scalars (no host sync)."""
        if self.collect_target_entropy:
            row_entropy = torch.special.entr(q).sum(1)
        else:
            row_entropy = q.new_full((q.shape[0],), math.nan)
        packed = torch.stack([soft_argmax.float(), q.argmax(1).float(), row_entropy], dim=1)
        packed = dist.all_gather_cat(packed)  # [N_g, 3], rank order
        assert packed.shape[0] == self._global_rows, "ranks disagree on the rows of this call"
        for column, name in enumerate(("soft_argmax_window", "sharp_argmax_window")):
            indices = packed[:, column].long()
            if initialising:
                setattr(self, name, indices.expand(self.history_window.shape[0], -1).clone())
            else:
                getattr(self, name)[slot].copy_(indices)
        self._last_call = {"target_entropy": packed[:, 2].mean(), "boosted": rare.sum()}

    # -------------------------------------------------------------------------- diagnostics

    def diagnostics(self) -> dict[str, float]:
        """History entropy/max/min, prototypes used over the window, last-call target stats.

        Computed on demand (the cached block sums, a bincount over each argmax ring); identical
        on every rank; NaN (except ``log_k``) before the first call. ``target_entropy`` is the mean
        over all ranks' rows of the last call's q, ``boosted`` its number of rare prototypes.
        """
        out = {"log_k": math.log(self.num_prototypes)}
        names = ("history_entropy", "history_max", "history_min", "protos_used_soft", "protos_used_sharp")
        if not self._global_rows:
            return out | dict.fromkeys((*names, "target_entropy", "boosted"), math.nan)
        history = self._history()
        p = history / history.sum()
        stats = [
            -torch.special.xlogy(p, p).sum(),
            history.max(),
            history.min(),
            self._prototypes_used(self.soft_argmax_window),
            self._prototypes_used(self.sharp_argmax_window),
        ]
        out |= {name: float(value) for name, value in zip(names, stats)}
        last = self._last_call or {}
        out["target_entropy"] = float(last["target_entropy"]) if last else math.nan
        out["boosted"] = float(last["boosted"]) if last else math.nan
        return out

    def _prototypes_used(self, ring: torch.Tensor) -> torch.Tensor:
        return torch.bincount(ring.flatten(), minlength=self.num_prototypes).count_nonzero()

    # ------------------------------------------------------------------- snapshot / restore

    def snapshot(self) -> _UndoRecord:
        """A cheap undo record for the next call: scalars, references, one row per buffer."""
        initialised = bool(self._global_rows)
        return _UndoRecord(
            num_calls=self._num_calls,
            position=self._position,
            pushes=self._pushes,
            global_rows=self._global_rows,
            buffers={name: getattr(self, name) for name in self._WINDOW_BUFFERS},
            slots={name: getattr(self, name)[self._position].clone() for name in self._WINDOW_BUFFERS}
            if initialised
            else None,
            last_call=self._last_call,
        )

    def restore(self, record: _UndoRecord) -> None:
        """Undo the (at most one) call made since ``record = snapshot()``, bit for bit."""
        if self._num_calls - record.num_calls > 1:
            raise RuntimeError(
                f"DTCH.restore undoes one call, but {self._num_calls - record.num_calls} calls were "
                "made since the snapshot; take a snapshot before each call"
            )
        for name, tensor in record.buffers.items():
            setattr(self, name, tensor)
            if record.slots is not None:
                tensor[record.position].copy_(record.slots[name])
        self._position, self._pushes = record.position, record.pushes
        self._global_rows, self._last_call = record.global_rows, record.last_call
        self._num_calls = record.num_calls
        self._block_sums = None  # rebuilt from the restored rows on the next call

    # ------------------------------------------------------------------------- state dict

    def get_extra_state(self) -> dict[str, int]:
        return {
            "version": _STATE_VERSION,
            "position": self._position,
            "pushes": self._pushes,
            "global_rows": self._global_rows,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        rows = self.history_window.shape[0]
        position, pushes, global_rows = state["position"], state["pushes"], state["global_rows"]
        consistent = (global_rows == 0 and rows == 0) or (global_rows > 0 and 0 <= position < rows)
        if state.get("version") != _STATE_VERSION or not consistent or pushes < 0:
            raise ValueError(f"DTCH: inconsistent state (window of {rows} rows, extra state {state})")
        self._position, self._pushes, self._global_rows = int(position), int(pushes), int(global_rows)
        self._last_call = None
        self._block_sums = None

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # The window's shape is only known after the first call: resize our buffers to the
        # incoming ones (same K) so that a fresh module can load a used one.
        self._block_sums = None
        for name in self._WINDOW_BUFFERS:
            incoming, current = state_dict.get(prefix + name), getattr(self, name)
            if not torch.is_tensor(incoming) or incoming.dim() != 2 or incoming.shape == current.shape:
                continue
            if name == "history_window" and incoming.shape[1] != self.num_prototypes:
                continue  # let the default loader report the size mismatch
            setattr(self, name, torch.empty(incoming.shape, dtype=current.dtype, device=current.device))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return (
            f"num_prototypes={self.num_prototypes}, history_size={self.history_size}, "
            f"temp_scale={self.temp_scale:g}, exp_power={self.exp_power:g}, "
            f"balance_beta={self.balance_beta:g}, boost_enabled={self.boost_enabled}, "
            f"logit_clamp={self.logit_clamp:g}"
        )
