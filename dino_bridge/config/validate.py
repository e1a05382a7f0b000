"""Value rules for every user-settable config key, checked when the config is loaded.

A config that loads can be built: every range, positivity, list order, multiple of the patch size
and schedule value that a builder, a constructor or the first step would trip over is checked
here, before anything is built, and fails with one line that names the key, its value and what
is allowed::

    config key 'schedules.lr.peak' is -1.0; allowed: a number > 0

``RULES`` maps a dotted key to its rule; ``data.*.dataset_ratio`` applies to every dataset. One
line per key: checking a new key is adding an entry (the table is checked in order, so a rule
that reads another key comes after that key's own rule). Types are already enforced by the
structured schema; keys left out here are booleans, free-form strings, or keys that
``config.features`` refuses while they are set (superseded and unsupported ones).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

Check = Callable[[Any, DictConfig], bool]


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING = _Missing()


@dataclass(frozen=True)
class Rule:
    """``ok(value, cfg)``; ``allowed`` says what is allowed (a string, or a function of the config
    when it depends on another key)."""

    ok: Check
    allowed: str | Callable[[DictConfig], str]

    def describe(self, cfg: DictConfig) -> str:
        return self.allowed(cfg) if callable(self.allowed) else self.allowed

    def failure(self, key: str, value: Any, cfg: DictConfig) -> str | None:
        """The one-line error for ``value`` at ``key``, or None when it is allowed."""
        if self.ok(value, cfg):
            return None
        return f"config key '{key}' is {_shown(value)}; {self.describe(cfg)}"


class ScheduleOrNumber(Rule):
    """A number, or a schedule mapping: a bad entry is named by its own key (``...weight.peak``)."""

    def failure(self, key: str, value: Any, cfg: DictConfig) -> str | None:
        if not isinstance(value, DictConfig):
            return super().failure(key, value, cfg)
        for name, entry in value.items():
            if not self.ok(entry, cfg) and not (name == "cosine_epochs" and entry is None):
                return f"config key '{key}.{name}' is {_shown(entry)}; {self.describe(cfg)}"
        return None


# ---------------------------------------------------------------------------------- rule makers
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _num(x) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _bounds_text(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {_num(lo)}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {_num(hi)}"
    return ""


def _in_bounds(value, lo, hi, lo_open: bool, hi_open: bool) -> bool:
    if lo is not None and (value <= lo if lo_open else value < lo):
        return False
    return not (hi is not None and (value >= hi if hi_open else value > hi))


def number(lo=None, hi=None, *, lo_open=False, hi_open=False, null=False) -> Rule:
    """A finite number within the bounds (``null``: or null)."""
    bounds = _bounds_text(lo, hi, lo_open, hi_open)
    text = "a finite number" if not bounds else f"a number {bounds}"

    def ok(value, cfg):
        if value is None:
            return null
        return _is_number(value) and _in_bounds(value, lo, hi, lo_open, hi_open)

    return Rule(ok, f"allowed: {text}{' or null' if null else ''}")


def integer(lo=None, hi=None, *, null=False) -> Rule:
    bounds = _bounds_text(lo, hi, False, False)
    text = "an integer" + (f" {bounds}" if bounds else "")

    def ok(value, cfg):
        if value is None:
            return null
        return (
            isinstance(value, int) and not isinstance(value, bool) and _in_bounds(value, lo, hi, False, False)
        )

    return Rule(ok, f"allowed: {text}{' or null' if null else ''}")


def one_of(*values: Any) -> Rule:
    return Rule(lambda value, cfg: value in values, f"valid values: {', '.join(map(str, values))}")


def one_of_registry(load: Callable[[], Any]) -> Rule:
    """A name from a registry that is imported only when the rule runs (the model presets)."""
    return Rule(lambda value, cfg: value in load(), lambda cfg: f"valid values: {', '.join(load())}")


def ordered_pair(lo: float = 0.0, hi: float = 1.0, *, lo_open: bool = False) -> Rule:
    """``[low, high]`` with lo <= low <= high <= hi (lo < low when ``lo_open``)."""

    def ok(value, cfg):
        if not isinstance(value, (list, tuple, ListConfig)) or len(value) != 2:
            return False
        low, high = value
        return (
            _is_number(low)
            and _is_number(high)
            and _in_bounds(low, lo, hi, lo_open, False)
            and _in_bounds(high, lo, hi, lo_open, False)
            and low <= high
        )

    return Rule(ok, f"allowed: [low, high] with {lo:g} {'<' if lo_open else '<='} low <= high <= {hi:g}")


def numbers(count: int, lo=None, *, lo_open=False) -> Rule:
    bounds = _bounds_text(lo, None, lo_open, False)

    def ok(value, cfg):
        if not isinstance(value, (list, tuple, ListConfig)) or len(value) != count:
            return False
        return all(_is_number(v) and _in_bounds(v, lo, None, lo_open, False) for v in value)

    return Rule(ok, f"allowed: a list of {count} numbers{' ' + bounds if bounds else ''}")


def weight_or_schedule() -> Rule:
    """An auxiliary loss weight: a number >= 0, or a schedule mapping whose values are >= 0."""
    return ScheduleOrNumber(
        lambda v, cfg: _is_number(v) and v >= 0, "allowed: a number >= 0 (or a schedule of them)"
    )


def multiple_of_patch(*, unless: Check | None = None) -> Rule:
    """A positive multiple of ``student.patch_size`` (any positive integer where ``unless`` holds)."""

    def ok(value, cfg):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return False
        if int(cfg.student.patch_size) < 1:  # reported by its own rule
            return True
        return (unless is not None and unless(value, cfg)) or value % int(cfg.student.patch_size) == 0

    return Rule(
        ok, lambda cfg: f"allowed: a positive multiple of student.patch_size ({cfg.student.patch_size})"
    )


def _demo_names():
    from ..data.datasets import DEMO_DATASETS

    return sorted(DEMO_DATASETS)


def _arch_names():
    from ..models.vit import ARCHS

    return list(ARCHS)


def _devices():
    from ..distributed.device import BACKENDS

    return ("auto", *BACKENDS)


SOURCE_KINDS = ("txt_path", "root", "demo", "h5_list", "wsi_index", "shards")


def _set_kinds(value) -> list[str]:
    return [k for k in SOURCE_KINDS if value[k] not in (None, "")]


class OneSource(Rule):
    """A dataset under ``data:`` names exactly one kind of source; the error lists those it set."""

    def failure(self, key: str, value: Any, cfg: DictConfig) -> str | None:
        chosen = _set_kinds(value)
        if len(chosen) == 1:
            return None
        shown = ", ".join(f"{k}={value[k]!r}" for k in chosen) or "no source"
        return f"config key '{key}' sets {shown}; {self.describe(cfg)}"


def labelled_set() -> Rule:
    """A labelled image set of the online kNN: required while ``evaluation.knn_period`` > 0 (whether
    the folder exists is checked when training starts, not when a config loads)."""

    def allowed(cfg):
        demos = ", ".join(f"{n}[:split]" for n in _demo_names())
        return (
            f"allowed: an image folder with class subfolders or a demo dataset ({demos}) while"
            f" evaluation.knn_period is {cfg.evaluation.knn_period}"
        )

    return Rule(lambda value, cfg: value not in (None, "") or int(cfg.evaluation.knn_period) == 0, allowed)


def _heads(cfg) -> int:
    from ..models.vit import ARCHS

    heads = cfg.student.num_heads
    if heads is None:
        heads = ARCHS.get(cfg.student.arch, {}).get("num_heads", 1)
    return int(heads) if isinstance(heads, int) and heads > 0 else 1


def _width(cfg) -> int:
    from ..models.vit import ARCHS

    width = cfg.student.embed_dim
    return int(width) if isinstance(width, int) else int(ARCHS.get(cfg.student.arch, {}).get("embed_dim", 4))


def _heads_fit(embed_dim: int, cfg) -> bool:
    return embed_dim > 0 and embed_dim % (4 * _heads(cfg)) == 0


def rope_period(bound: str) -> Rule:
    """DINOv3's RoPE takes ``base`` or both periods (min < max), never both kinds."""

    def ok(value, cfg):
        s = cfg.student
        if s.pos_embed_rope_base is not None:
            return value is None
        low, high = s.pos_embed_rope_min_period, s.pos_embed_rope_max_period
        if not _is_number(value) or value <= 0:
            return False
        return bound == "min" or not _is_number(low) or low < high

    def allowed(cfg):
        if cfg.student.pos_embed_rope_base is not None:
            return "allowed: null while student.pos_embed_rope_base is set"
        extra = " above student.pos_embed_rope_min_period" if bound == "max" else ""
        return f"allowed: a number > 0{extra} (student.pos_embed_rope_base is null)"

    return Rule(ok, allowed)


def _batch_for_koleo(value, cfg) -> bool:
    """KoLeo on the CLS searches each crop's batch for a nearest neighbour: it needs two images."""
    return isinstance(value, int) and value >= (2 if cfg.dino.koleo_cls_loss_weight > 0 else 1)


def _no_local_crops(value, cfg) -> bool:
    return int(cfg.crops.local_crops_number) == 0


# ---------------------------------------------------------------------------------------- table
_PROBABILITY = number(0, 1)
_WEIGHT = number(0)
_POSITIVE = number(0, lo_open=True)
_COUNT = integer(1)
_HEAD = {
    "head_n_prototypes": integer(1, 1 << 24),  # DTCH gathers argmax indices in fp32: exact to 2^24
    "head_bottleneck_dim": _COUNT,
    "head_nlayers": _COUNT,
    "head_hidden_dim": _COUNT,
}
_RGB = Rule(lambda v, cfg: v == 3, "allowed: 3 (images are read as RGB)")


def _schedule_rules(name: str, values: Rule) -> dict[str, Rule]:
    rules = {f"schedules.{name}.{k}": values for k in ("start", "peak", "end")}
    rules[f"schedules.{name}.warmup_epochs"] = number(0)
    rules[f"schedules.{name}.cosine_epochs"] = number(0, null=True)
    rules[f"schedules.{name}.freeze_last_layer_epochs"] = number(0)
    return rules


RULES: dict[str, Rule] = {
    "MODEL.META_ARCHITECTURE": one_of("SSLMetaArch", "SSLResizeShuffle"),
    "MODEL.DEVICE": Rule(
        lambda v, cfg: str(v).lower() in _devices(), lambda cfg: f"valid values: {', '.join(_devices())}"
    ),
    "compute_precision.param_dtype": one_of("fp32", "bf16", "fp16"),
    "compute_precision.reduce_dtype": one_of("fp32", "bf16", "fp16"),
    "compute_precision.sharding_strategy": one_of("SHARD_GRAD_OP", "FULL_SHARD", "NO_SHARD"),
    "compute_precision.parallel": one_of("auto", "fsdp", "dp"),
    # -- losses and heads
    "dino.loss_weight": _WEIGHT,
    **{f"dino.{k}": rule for k, rule in _HEAD.items()},
    "dino.koleo_cls_loss_weight": _WEIGHT,
    "dino.koleo_patch_loss_weight": _WEIGHT,
    "dino.koleo_cls_gate_threshold": number(),
    "dino.koleo_patch_gate_threshold": number(),
    "dino.koleo_gate_slope": _POSITIVE,
    "dino.koleo_topk": _COUNT,
    "dino.koleo_distributed_replicas": integer(0),
    "dino.koleo_distributed_loss_group_size": integer(1, null=True),
    "dino.student_temp": _POSITIVE,
    "ibot.loss_weight": _WEIGHT,
    "ibot.mask_sample_probability": _PROBABILITY,
    "ibot.mask_ratio_min_max": ordered_pair(0, 1),
    **{f"ibot.{k}": rule for k, rule in _HEAD.items()},
    # -- training
    "train.batch_size_per_gpu": Rule(
        _batch_for_koleo,
        lambda cfg: (
            "allowed: an integer >= 2 (KoLeo on the CLS needs two images per crop)"
            if cfg.dino.koleo_cls_loss_weight > 0
            else "allowed: an integer >= 1"
        ),
    ),
    "train.seed": integer(0),
    "train.num_workers": integer(0),
    "train.OFFICIAL_EPOCH_LENGTH": _COUNT,
    "train.log_period": _COUNT,
    "train.stop_at_iteration": integer(1, null=True),
    "train.max_nonfinite_steps": _COUNT,
    "train.saveckp_freq": integer(0, null=True),
    "train.centering": one_of("sinkhorn_knopp", "centering"),
    # -- the backbone (student.patch_size before the crop sizes that must be its multiples)
    "student.arch": one_of_registry(_arch_names),
    "student.patch_size": _COUNT,
    "student.drop_path_rate": number(0, 1, hi_open=True),
    "student.layerscale": number(0, lo_open=True, null=True),
    "student.patch_drop": number(0, 1, hi_open=True),
    "student.ffn_layer": one_of("mlp", "swiglu", "swiglu32", "swiglu64", "swiglu128"),
    "student.ffn_ratio": number(0, lo_open=True, null=True),
    "student.num_heads": Rule(
        lambda v, cfg: (
            v is None
            or (isinstance(v, int) and not isinstance(v, bool) and v > 0 and _heads_fit(_width(cfg), cfg))
        ),
        lambda cfg: (
            f"allowed: null or an integer >= 1 with the width ({_width(cfg)}) a multiple of 4 * num_heads"
        ),
    ),
    "student.depth": integer(1, null=True),
    "student.embed_dim": Rule(
        lambda v, cfg: v is None or (isinstance(v, int) and not isinstance(v, bool) and _heads_fit(v, cfg)),
        lambda cfg: (
            f"allowed: null or a positive multiple of 4 * num_heads ({4 * _heads(cfg)}, for 2-D RoPE)"
        ),
    ),
    "student.norm_layer": one_of("layernorm", "layernormbf16", "rmsnorm"),
    "student.n_storage_tokens": integer(0),
    "student.in_chans": _RGB,
    "teacher.in_chans": _RGB,
    "student.pos_embed_rope_base": number(0, lo_open=True, null=True),
    "student.pos_embed_rope_min_period": rope_period("min"),
    "student.pos_embed_rope_max_period": rope_period("max"),
    "student.pos_embed_rope_normalize_coords": one_of("separate", "max", "min"),
    "student.pos_embed_rope_shift_coords": number(0, null=True),
    "student.pos_embed_rope_jitter_coords": number(1, null=True),
    "student.pos_embed_rope_rescale_coords": number(1, null=True),
    "student.pos_embed_rope_dtype": one_of("fp32", "bf16", "fp16"),
    # -- superseded v1 keys (config.features refuses them unless null): at least sane values
    "teacher.momentum_teacher": number(0, 1, null=True),
    "teacher.final_momentum_teacher": number(0, 1, null=True),
    "teacher.warmup_teacher_temp": number(0, lo_open=True, null=True),
    "teacher.teacher_temp": number(0, lo_open=True, null=True),
    "teacher.warmup_teacher_temp_epochs": integer(0, null=True),
    "optim.weight_decay": number(0, null=True),
    "optim.weight_decay_end": number(0, null=True),
    "optim.lr": number(0, null=True),
    "optim.min_lr": number(0, null=True),
    "optim.warmup_epochs": integer(0, null=True),
    "optim.schedule_trunc_extra": number(0, null=True),
    "optim.freeze_last_layer_epochs": integer(0, null=True),
    # -- optimisation
    "optim.epochs": _COUNT,
    "optim.clip_grad": number(0),  # 0: no clipping
    "optim.scaling_rule": one_of("sqrt_wrt_1024", "linear_wrt_256", "none"),
    "optim.patch_embed_lr_mult": _WEIGHT,
    "optim.dino_head_wd_multiplier": _WEIGHT,
    "optim.dino_head_lr_multiplier": _WEIGHT,
    "optim.layerwise_decay": number(0, 1, lo_open=True),
    "optim.adamw_beta1": number(0, 1, hi_open=True),
    "optim.adamw_beta2": number(0, 1, hi_open=True),
    # -- crops
    "crops.global_crops_scale": ordered_pair(0, 1, lo_open=True),
    "crops.local_crops_scale": ordered_pair(0, 1, lo_open=True),
    "crops.local_crops_number": integer(0),
    "crops.global_crops_size": multiple_of_patch(),
    "crops.local_crops_size": multiple_of_patch(unless=_no_local_crops),
    "crops.rgb_mean": numbers(3),
    "crops.rgb_std": numbers(3, 0, lo_open=True),
    "crops.view_pipeline": one_of("reference", "fast"),
    "crops.jpeg_draft_min_side": integer(0),
    # -- checkpoints
    "checkpointing.period": _COUNT,
    "checkpointing.max_to_keep": integer(0),  # 0: keep all
    "checkpointing.keep_every": integer(0),
    # -- schedules
    **_schedule_rules("lr", number(0)),
    "schedules.lr.peak": _POSITIVE,
    **_schedule_rules("weight_decay", number(0)),
    **_schedule_rules("teacher_temp", _POSITIVE),
    **_schedule_rules("momentum", number(0, 1)),
    # -- data
    "data.*": OneSource(
        lambda v, cfg: len(_set_kinds(v)) == 1, f"allowed: exactly one of {', '.join(SOURCE_KINDS)}"
    ),
    "data.*.dataset_ratio": number(0, 1, lo_open=True),
    "data.*.demo": Rule(
        lambda v, cfg: v in (None, "") or v in _demo_names(),
        lambda cfg: f"valid values: {', '.join(_demo_names())} or null",
    ),
    # -- the invariance streams (Crop-Resize / PatchRoll / bridge)
    "resize_shuffle_augmentor.resize_paste_loss_weight": weight_or_schedule(),
    "resize_shuffle_augmentor.patch_shuffle_loss_weight": weight_or_schedule(),
    "resize_shuffle_augmentor.bridge_patchshuffle_weight": weight_or_schedule(),
    "resize_shuffle_augmentor.bridge_global_weight": weight_or_schedule(),
    "resize_shuffle_augmentor.patch_shuffle_patch_weight": weight_or_schedule(),
    "resize_shuffle_augmentor.patch_shuffle_cls_weight": weight_or_schedule(),
    "resize_shuffle_augmentor.patch_shuffle_patch_probability": _PROBABILITY,
    "resize_shuffle_augmentor.patch_shuffle_patch_min_max": ordered_pair(0, 1),
    "resize_shuffle_augmentor.bridge_ibot_gate": number(0, null=True),
    "resize_shuffle_augmentor.patch_size": _COUNT,
    "resize_shuffle_augmentor.r_plain_probability": _PROBABILITY,
    "resize_shuffle_augmentor.o_squash_probability": _PROBABILITY,
    "resize_shuffle_augmentor.resize_paste_crop_probability": _PROBABILITY,
    "resize_shuffle_augmentor.resize_paste_crop_scale": ordered_pair(0, 1, lo_open=True),
    "resize_shuffle_augmentor.resize_paste_ratio": ordered_pair(0, 1, lo_open=True),
    "resize_shuffle_augmentor.resize_paste_keep_aspect_probability": _PROBABILITY,
    "resize_shuffle_augmentor.patch_roll_max_shift": integer(0),
    "resize_shuffle_augmentor.bridge_hidden_dim": integer(1, null=True),
    "resize_shuffle_augmentor.bridge_input_clamp": _POSITIVE,
    "resize_shuffle_augmentor.bridge_logit_clamp": _POSITIVE,
    # -- DTCH teacher targets (the ranges DTCH's constructor enforces, named by config key)
    "dtch.patch_hist_cache": _COUNT,
    "dtch.cls_hist_cache": _COUNT,
    "dtch.temp_scale": _POSITIVE,
    "dtch.exp_power": number(0, lo_open=True, null=True),
    "dtch.balance_beta": number(),
    "dtch.boost_alpha": _POSITIVE,
    "dtch.boost_w_max": number(1),
    "dtch.boost_divisor": _POSITIVE,
    "dtch.boost_eps": number(0),
    "dtch.logit_clamp": number(-30, 60, lo_open=True),  # the lower clamp is fixed at -30
    # -- online evaluation (evaluation.knn_period before the sets it requires)
    "evaluation.knn_period": integer(0),  # 0: off
    "evaluation.knn_train": labelled_set(),
    "evaluation.knn_val": labelled_set(),
    "evaluation.knn_k": _COUNT,
    "evaluation.knn_temperature": _POSITIVE,
    "evaluation.knn_limit_train": integer(1, null=True),
    "evaluation.knn_limit_val": integer(1, null=True),
    "evaluation.knn_batch_size": _COUNT,
    "evaluation.knn_num_workers": integer(0),
}


# ------------------------------------------------------------------------------------- checking
def _expand(cfg: DictConfig, pattern: str) -> list[str]:
    """Concrete keys of ``pattern``: ``data.*.dataset_ratio`` -> one key per dataset."""
    keys = [""]
    for part in pattern.split("."):
        nxt = []
        for prefix in keys:
            if part != "*":
                nxt.append(f"{prefix}.{part}" if prefix else part)
                continue
            node = OmegaConf.select(cfg, prefix)
            nxt.extend(f"{prefix}.{name}" for name in (node.keys() if isinstance(node, DictConfig) else ()))
        keys = nxt
    return keys


def _shown(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    return repr(value)


def first_problem(cfg: DictConfig, rules: dict[str, Rule] | None = None) -> tuple[str, str] | None:
    """(key, message) of the first value, in table order, that its rule does not allow.

    Only the first: a rule may read keys checked before it (the patch size of a crop size)."""
    for pattern, rule in (RULES if rules is None else rules).items():
        for key in _expand(cfg, pattern):
            value = OmegaConf.select(cfg, key, default=MISSING)
            assert value is not MISSING, f"validate.RULES names '{key}', which the schema does not have"
            message = rule.failure(key, value, cfg)
            if message is not None:
                return key, message
    return None


def validate(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` for the first value that is not allowed (one line, naming the key)."""
    from .load import ConfigError

    problem = first_problem(cfg)
    if problem is not None:
        raise ConfigError(problem[1])
