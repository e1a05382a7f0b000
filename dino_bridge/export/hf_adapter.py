"""The one key map between our backbone and Hugging Face's ``DINOv3ViTModel`` (both directions).

Shapes: D width, R storage (register) tokens, L blocks. Field names checked against transformers
5.24 (``DINOv3ViTConfig``). HF's on-disk keys are ``embeddings.*``, ``layer.{i}.*`` and ``norm.*``
(``save_pretrained`` writes ``layer.``; the in-memory module says ``model.layer.``: both are read).

What does not map 1:1, handled explicitly:
- the fused ``qkv`` [3D, D] is split into q/k/v; with ``mask_k_bias`` the (inert) K bias is dropped
  and HF's ``key_bias`` is false; on import the K bias comes back as zeros;
- ``local_cls_norm`` (training-only) is dropped on export and rebuilt as a copy of ``norm``;
- the buffers ``rope_embed.periods`` and ``qkv.bias_mask`` are not stored by HF: checked against
  their derivation on export, re-derived on import;
- no LayerScale on our side is exported as gammas of ones (exact).
Anything HF has no field for is refused with a ``ValueError`` naming the field.
"""

from __future__ import annotations

import inspect
import logging
import re

import torch

from ..models.layers import swiglu_hidden_dim
from ..models.rope import RopePositionEmbedding, resolve_rope_dtype
from ..models.vit import ARCHS, DinoVisionTransformer

logger = logging.getLogger("dino_bridge")

NORM_EPS = {"layernorm": 1e-6, "layernormbf16": 1e-5}
# HF fields that fix the computation; they must agree when HF weights go into a configured backbone.
ARCH_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "use_gated_mlp",
    "hidden_act", "patch_size", "num_channels", "num_register_tokens", "layer_norm_eps", "rope_theta",
    "query_bias", "key_bias", "value_bias", "proj_bias", "mlp_bias",
)  # fmt: skip


# DINOv3ViTConfig defaults (transformers 5.24), for config.json files that omit a field.
HF_DEFAULTS = {
    "hidden_act": "gelu", "use_gated_mlp": False, "patch_size": 16, "num_channels": 3,
    "num_register_tokens": 0, "layer_norm_eps": 1e-5, "rope_theta": 100.0, "query_bias": True,
    "key_bias": False, "value_bias": True, "proj_bias": True, "mlp_bias": True,
}  # fmt: skip


def resolved_arguments(spec: dict) -> dict:
    """Every constructor argument of the backbone described by ``spec`` (preset + kwargs + defaults)."""
    defaults = {
        name: p.default
        for name, p in inspect.signature(DinoVisionTransformer.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    return {**defaults, **ARCHS[spec["arch"]], **spec["kwargs"]}


def _refuse(field: str, value, why: str):
    raise ValueError(f"cannot export to Hugging Face DINOv3: {field}={value!r}: {why}")


def hf_config_from_spec(spec: dict, ffn_width: int) -> dict:
    """The ``DINOv3ViTConfig`` fields for our backbone, or a ValueError naming a field HF lacks."""
    a = resolved_arguments(spec)
    if a["norm_layer"] not in NORM_EPS:
        _refuse("norm_layer", a["norm_layer"], "HF DINOv3 has only LayerNorm")
    if a["untie_cls_and_patch_norms"]:
        _refuse("untie_cls_and_patch_norms", True, "HF DINOv3 has one final norm for every token")
    if a["pos_embed_rope_base"] is None:
        _refuse("pos_embed_rope_min_period", a["pos_embed_rope_min_period"], "HF RoPE has only rope_theta")
    if a["pos_embed_rope_normalize_coords"] != "separate":
        _refuse("pos_embed_rope_normalize_coords", a["pos_embed_rope_normalize_coords"], "HF uses 'separate'")
    gated = a["ffn_layer"].startswith("swiglu")
    return {
        "architectures": ["DINOv3ViTModel"],
        "model_type": "dinov3_vit",
        "hidden_size": int(a["embed_dim"]),
        "num_hidden_layers": int(a["depth"]),
        "num_attention_heads": int(a["num_heads"]),
        "intermediate_size": int(ffn_width),
        "use_gated_mlp": gated,
        "hidden_act": "silu" if gated else "gelu",
        "patch_size": int(a["patch_size"]),
        "image_size": int(a["img_size"]),
        "num_channels": int(a["in_chans"]),
        "num_register_tokens": int(a["n_storage_tokens"]),
        "layer_norm_eps": NORM_EPS[a["norm_layer"]],
        "rope_theta": float(a["pos_embed_rope_base"]),
        "query_bias": bool(a["qkv_bias"]),
        "key_bias": bool(a["qkv_bias"] and not a["mask_k_bias"]),
        "value_bias": bool(a["qkv_bias"]),
        "proj_bias": bool(a["proj_bias"]),
        "mlp_bias": bool(a["ffn_bias"]),
        "layerscale_value": float(a["layerscale_init"] or 1.0),
        "drop_path_rate": 0.0,
        "pos_embed_shift": a["pos_embed_rope_shift_coords"] or None,
        "pos_embed_jitter": a["pos_embed_rope_jitter_coords"] or None,
        "pos_embed_rescale": a["pos_embed_rope_rescale_coords"] or None,
        "dtype": "float32",
    }


def _ffn_names(gated: bool) -> dict[str, str]:
    """our FFN linear → HF's."""
    return (
        {"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"}
        if gated
        else {"fc1": "up_proj", "fc2": "down_proj"}
    )


def derived_buffers(spec: dict) -> dict[str, torch.Tensor]:
    """The buffers HF does not store, computed from the spec (what ``init_weights`` writes)."""
    a = resolved_arguments(spec)
    rope = RopePositionEmbedding(
        a["embed_dim"], a["num_heads"], base=a["pos_embed_rope_base"], dtype=a["pos_embed_rope_dtype"]
    )
    rope.init_weights()
    out = {"rope_embed.periods": rope.periods}
    if a["mask_k_bias"] and a["qkv_bias"]:
        mask = torch.ones(3 * a["embed_dim"])
        mask[a["embed_dim"] : 2 * a["embed_dim"]] = 0.0
        for i in range(a["depth"]):
            out[f"blocks.{i}.attn.qkv.bias_mask"] = mask
    return out


def to_hf(spec: dict, state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json fields, HF on-disk tensors in fp32) from our backbone ``state``.

    Every tensor of ``state`` is mapped, dropped (training-only, logged) or checked as derived;
    anything else is an error."""
    a = resolved_arguments(spec)
    gated = a["ffn_layer"].startswith("swiglu")
    width = state["blocks.0.mlp.w1.weight" if gated else "blocks.0.mlp.fc1.weight"]
    config = hf_config_from_spec(spec, width.shape[0])
    D, seen, out = int(a["embed_dim"]), set(), {}

    def take(key: str) -> torch.Tensor:
        seen.add(key)
        return state[key]

    out["embeddings.cls_token"] = take("cls_token")
    out["embeddings.mask_token"] = take("mask_token").reshape(1, 1, D)
    out["embeddings.register_tokens"] = (
        take("storage_tokens") if a["n_storage_tokens"] else torch.zeros(1, 0, D)
    )
    for p in ("weight", "bias"):
        out[f"embeddings.patch_embeddings.{p}"] = take(f"patch_embed.proj.{p}")
        out[f"norm.{p}"] = take(f"norm.{p}")
    for i in range(int(a["depth"])):
        ours, hf = f"blocks.{i}.", f"layer.{i}."
        for norm in ("norm1", "norm2"):
            for p in ("weight", "bias"):
                out[f"{hf}{norm}.{p}"] = take(f"{ours}{norm}.{p}")
        q, k, v = take(f"{ours}attn.qkv.weight").chunk(3)
        out.update({f"{hf}attention.{n}_proj.weight": t for n, t in zip("qkv", (q, k, v))})
        if a["qkv_bias"]:
            qb, kb, vb = take(f"{ours}attn.qkv.bias").chunk(3)
            out[f"{hf}attention.q_proj.bias"], out[f"{hf}attention.v_proj.bias"] = qb, vb
            if config["key_bias"]:
                out[f"{hf}attention.k_proj.bias"] = kb
        out[f"{hf}attention.o_proj.weight"] = take(f"{ours}attn.proj.weight")
        if a["proj_bias"]:
            out[f"{hf}attention.o_proj.bias"] = take(f"{ours}attn.proj.bias")
        for n in ("1", "2"):
            gamma = f"{ours}ls{n}.gamma"
            out[f"{hf}layer_scale{n}.lambda1"] = take(gamma) if a["layerscale_init"] else torch.ones(D)
        for mine, theirs in _ffn_names(gated).items():
            out[f"{hf}mlp.{theirs}.weight"] = take(f"{ours}mlp.{mine}.weight")
            if a["ffn_bias"]:
                out[f"{hf}mlp.{theirs}.bias"] = take(f"{ours}mlp.{mine}.bias")
    for key, value in derived_buffers(spec).items():
        if not torch.equal(take(key).float(), value.float()):
            raise ValueError(f"{key} differs from its derivation from the config; HF re-derives it")
    dropped = sorted(k for k in state if k.startswith("local_cls_norm."))
    seen.update(dropped)
    if dropped:
        logger.info("export hf: dropped the training-only local-crop CLS norm (%s)", ", ".join(dropped))
    unmapped = sorted(state.keys() - seen)
    assert not unmapped, f"tensors with no HF counterpart: {unmapped}"
    return config, {k: v.detach().float().contiguous() for k, v in out.items()}


def spec_from_hf(config: dict, rope_dtype: str = "fp32") -> dict:
    """Our backbone spec for an HF DINOv3 config (the inverse of ``hf_config_from_spec``)."""
    D, width = int(config["hidden_size"]), int(config["intermediate_size"])
    gated = bool(config.get("use_gated_mlp", False))
    act = config.get("hidden_act", "gelu")
    if act != ("silu" if gated else "gelu"):
        raise ValueError(
            f"HF config hidden_act={act!r}: our {'SwiGLU' if gated else 'MLP'} uses"
            f" {'silu' if gated else 'gelu'}"
        )
    eps = float(config.get("layer_norm_eps", 1e-5))
    norm = next((name for name, e in NORM_EPS.items() if e == eps), None)
    if norm is None:
        raise ValueError(f"HF config layer_norm_eps={eps}: ours are {sorted(NORM_EPS.values())}")
    qb, kb, vb = (
        bool(config.get(f, d)) for f, d in (("query_bias", True), ("key_bias", False), ("value_bias", True))
    )
    if qb != vb or (kb and not qb):
        raise ValueError(f"HF config query_bias={qb}, key_bias={kb}, value_bias={vb}: our qkv has one bias")
    if gated:
        if width % 8:
            raise ValueError(f"HF config intermediate_size={width}: our SwiGLU widths are multiples of 8")
        hidden = width * 3 // 2
    else:
        hidden = width
    ratio = hidden / D if int(D * (hidden / D)) == hidden else (hidden + 0.5) / D
    assert (swiglu_hidden_dim(int(D * ratio), 8) if gated else int(D * ratio)) == width
    kwargs = dict(
        embed_dim=D, depth=int(config["num_hidden_layers"]), num_heads=int(config["num_attention_heads"]),
        ffn_ratio=ratio, ffn_layer="swiglu" if gated else "mlp", norm_layer=norm,
        img_size=int(config.get("image_size", 224)), patch_size=int(config.get("patch_size", 16)),
        in_chans=int(config.get("num_channels", 3)),
        n_storage_tokens=int(config.get("num_register_tokens", 0)),
        qkv_bias=qb, mask_k_bias=qb and not kb, proj_bias=bool(config.get("proj_bias", True)),
        ffn_bias=bool(config.get("mlp_bias", True)),
        layerscale_init=float(config.get("layerscale_value", 1.0)),
        pos_embed_rope_base=float(config.get("rope_theta", 100.0)),
        pos_embed_rope_shift_coords=config.get("pos_embed_shift"),
        pos_embed_rope_jitter_coords=config.get("pos_embed_jitter"),
        pos_embed_rope_rescale_coords=config.get("pos_embed_rescale", 2.0),
        pos_embed_rope_dtype=rope_dtype,
    )  # fmt: skip
    return {"arch": "vit_small", "kwargs": kwargs}


def _hf_key(key: str) -> str:
    return re.sub(r"^model\.layer\.", "layer.", key)


def from_hf(
    config: dict, tensors: dict[str, torch.Tensor], spec: dict | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(our spec, our backbone state) from HF tensors; ``spec`` (default: ``spec_from_hf``) says the
    layout to fill (a local-crop norm, K-bias mask, RoPE dtype); its architecture must agree."""
    spec = spec or spec_from_hf(config)
    a = resolved_arguments(spec)
    hf = {_hf_key(k): v for k, v in tensors.items()}
    D, gated = int(a["embed_dim"]), a["ffn_layer"].startswith("swiglu")
    seen, out = set(), {}

    def take(key: str) -> torch.Tensor:
        if key not in hf:
            raise ValueError(f"the HF weights lack {key}")
        seen.add(key)
        return hf[key]

    out["cls_token"] = take("embeddings.cls_token")
    out["mask_token"] = take("embeddings.mask_token").reshape(1, D)
    registers = take("embeddings.register_tokens") if "embeddings.register_tokens" in hf else None
    if a["n_storage_tokens"]:
        out["storage_tokens"] = registers
    for p in ("weight", "bias"):
        out[f"patch_embed.proj.{p}"] = take(f"embeddings.patch_embeddings.{p}")
        out[f"norm.{p}"] = take(f"norm.{p}")
        if a["untie_global_and_local_cls_norm"]:
            out[f"local_cls_norm.{p}"] = hf[f"norm.{p}"].clone()
    for i in range(int(a["depth"])):
        ours, h = f"blocks.{i}.", f"layer.{i}."
        for norm in ("norm1", "norm2"):
            for p in ("weight", "bias"):
                out[f"{ours}{norm}.{p}"] = take(f"{h}{norm}.{p}")
        out[f"{ours}attn.qkv.weight"] = torch.cat([take(f"{h}attention.{n}_proj.weight") for n in "qkv"])
        if a["qkv_bias"]:
            qb, vb = take(f"{h}attention.q_proj.bias"), take(f"{h}attention.v_proj.bias")
            kb = torch.zeros_like(qb) if a["mask_k_bias"] else take(f"{h}attention.k_proj.bias")
            out[f"{ours}attn.qkv.bias"] = torch.cat([qb, kb, vb])
        out[f"{ours}attn.proj.weight"] = take(f"{h}attention.o_proj.weight")
        if a["proj_bias"]:
            out[f"{ours}attn.proj.bias"] = take(f"{h}attention.o_proj.bias")
        for n in ("1", "2"):
            gamma = take(f"{h}layer_scale{n}.lambda1")
            if a["layerscale_init"]:
                out[f"{ours}ls{n}.gamma"] = gamma
            elif not torch.equal(gamma, torch.ones_like(gamma)):
                raise ValueError("student.layerscale is null but the HF weights have LayerScale gammas != 1")
        for mine, theirs in _ffn_names(gated).items():
            out[f"{ours}mlp.{mine}.weight"] = take(f"{h}mlp.{theirs}.weight")
            if a["ffn_bias"]:
                out[f"{ours}mlp.{mine}.bias"] = take(f"{h}mlp.{theirs}.bias")
    out.update(derived_buffers(spec))
    if registers is not None and not a["n_storage_tokens"]:
        assert registers.numel() == 0, registers.shape
    unused = sorted(hf.keys() - seen - {"embeddings.register_tokens"})
    if unused:
        raise ValueError(f"{len(unused)} HF tensors have no place in our backbone, e.g. {unused[:5]}")
    dtype = resolve_rope_dtype(a["pos_embed_rope_dtype"])
    out["rope_embed.periods"] = out["rope_embed.periods"].to(dtype)
    return spec, out


def check_compatible(config: dict, spec: dict, ffn_width: int) -> None:
    """HF ``config`` fits the configured backbone ``spec``: a ValueError names each field that differs."""
    ours = hf_config_from_spec(spec, ffn_width)
    diff = [
        f"{f}={config.get(f, HF_DEFAULTS.get(f))!r} (the configured backbone has {ours[f]!r})"
        for f in ARCH_FIELDS
        if config.get(f, HF_DEFAULTS.get(f)) != ours[f]
    ]
    if diff:
        raise ValueError("the HF DINOv3 config does not match the configured backbone: " + ", ".join(diff))
