"""Load, override, validate and save the config tree.

``load_config(path, overrides)`` = structured defaults ← YAML file ← ``key=value`` overrides.
Every user mistake raises ``ConfigError`` (a ``ValueError``) that names the full key path: an
unknown key also names the closest valid one, a wrong type names the expected type, a value
outside a fixed set lists the valid values.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .schema import Config
from .validate import validate

SCHEDULE_KEYS = ("start", "peak", "end", "zero_epochs", "warmup_epochs", "cosine_epochs")
AUX_WEIGHT_KEYS = (
    "resize_paste_loss_weight",
    "patch_shuffle_loss_weight",
    "patch_shuffle_patch_weight",
    "patch_shuffle_cls_weight",
    "bridge_patchshuffle_weight",
    "bridge_global_weight",
)


class ConfigError(ValueError):
    """A problem in the user's config, with the offending key in the message."""


# ----------------------------------------------------------------------------------------------
# The schema as a flat map: "dino.loss_weight" -> type; "data.*.txt_path" for dict entries.


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _schema_paths(cls=Config, prefix: str = "") -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for name, tp in _field_types(cls).items():
        key = f"{prefix}{name}"
        if _is_dataclass_type(tp):
            paths.update(_schema_paths(tp, key + "."))
        elif typing.get_origin(tp) is dict:
            value_type = typing.get_args(tp)[1]
            paths[key] = tp
            paths.update(_schema_paths(value_type, key + ".*."))
        else:
            paths[key] = tp
    return paths


SCHEMA_PATHS = _schema_paths()


def _type_name(tp) -> str:
    if tp is Any:
        return "any value"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is list:
        plural = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
        return f"a list of {plural.get(args[0], 'values')}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if _is_dataclass_type(tp):
        return f"a mapping ({tp.__name__})"
    return {int: "an integer", float: "a number", bool: "a boolean (true/false)", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _closest_key(full_key: str) -> str | None:
    """The valid key closest to ``full_key`` (wildcards filled with the user's dataset name)."""
    parts = full_key.split(".")
    candidates = sorted({p.rsplit(".", 1)[0] for p in SCHEMA_PATHS if "." in p and "*" not in p})
    for path in SCHEMA_PATHS:
        p = path.split(".")
        if "*" in p and len(parts) > p.index("*"):
            p[p.index("*")] = parts[p.index("*")]
        candidates.append(".".join(p))
    matches = difflib.get_close_matches(full_key, candidates, n=1, cutoff=0.6)
    if not matches:  # try the last component alone within the same section
        section = ".".join(parts[:-1])
        siblings = [c for c in candidates if c.rsplit(".", 1)[0] == section]
        names = difflib.get_close_matches(parts[-1], [s.rsplit(".", 1)[-1] for s in siblings], n=1)
        matches = [f"{section}.{names[0]}"] if names else []
    return matches[0] if matches else None


def _unknown_key_error(full_key: str, source: str) -> ConfigError:
    hint = _closest_key(full_key)
    suggestion = f"; did you mean '{hint}'?" if hint else ""
    return ConfigError(f"unknown config key '{full_key}' (in {source}){suggestion}")


def _check_keys(node: Any, cls, prefix: str, source: str) -> None:
    """Reject keys that the schema does not have, recursively."""
    if not isinstance(node, dict):
        return
    hints = _field_types(cls)
    for key, value in node.items():
        full_key = f"{prefix}{key}"
        if key not in hints:
            raise _unknown_key_error(full_key, source)
        tp = hints[key]
        if _is_dataclass_type(tp):
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"config key '{full_key}' must be {_type_name(tp)}, got {value!r}")
            _check_keys(value, tp, full_key + ".", source)
        elif typing.get_origin(tp) is dict and value is not None and not isinstance(value, dict):
            raise ConfigError(f"config key '{full_key}' must be a mapping, got {value!r} (in {source})")
        elif typing.get_origin(tp) is dict and isinstance(value, dict):
            value_type = typing.get_args(tp)[1]
            for name, entry in value.items():
                if not isinstance(entry, dict):
                    raise ConfigError(
                        f"config key '{full_key}.{name}' must be {_type_name(value_type)}, got {entry!r}"
                    )
                _check_keys(entry, value_type, f"{full_key}.{name}.", source)


def _merge(base: DictConfig, update: dict, source: str) -> DictConfig:
    _check_keys(update, Config, "", source)
    try:
        return OmegaConf.merge(base, update)
    except ConfigKeyError as e:  # pragma: no cover - _check_keys catches these first
        raise _unknown_key_error(str(e.full_key), source) from None
    except ValidationError as e:
        key = str(e.full_key)
        pattern = ".".join("*" if p not in SCHEMA_PATHS and i else p for i, p in enumerate(key.split(".")))
        tp = SCHEMA_PATHS.get(key) or SCHEMA_PATHS.get(pattern)
        expected = _type_name(tp) if tp is not None else "another type"
        raise ConfigError(
            f"config key '{key}' must be {expected}, got {_value_at(update, key)!r} (in {source})"
        ) from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid config in {source}: {_first_line(e)}") from None


def _value_at(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def parse_overrides(overrides: list[str]) -> dict:
    """``["a.b=1", "c=[1,2]"]`` -> nested dict; values are parsed as YAML (OmegaConf's dialect)."""
    tree: dict = {}
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if "=" not in item or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            parsed = OmegaConf.to_container(OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise ConfigError(f"override '{item}': cannot parse it ({_first_line(e)})") from None
        _deep_update(tree, parsed)
    return tree


def _deep_update(tree: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _deep_update(tree[key], value)
        else:
            tree[key] = value


def _first_line(error: Exception) -> str:
    """OmegaConf and PyYAML messages run over several lines; the first one says what is wrong."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line: what PyYAML found and where (``line 3, column 9``)."""
    problem = getattr(error, "problem", None)
    mark = getattr(error, "problem_mark", None)
    if problem is None:
        return _first_line(error)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    context = getattr(error, "context", None)
    return f"{problem}{' ' + context if context else ''}{where}"


def _read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path))
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(e)}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"config file {path} cannot be read: {_first_line(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _check_interpolations(cfg: DictConfig) -> None:
    """``${...}`` references must resolve (the run's config.yaml is saved resolved)."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"config key '{key}' cannot be resolved: {_first_line(e)}") from None


def _check_schedule_keys(cfg: DictConfig) -> None:
    """The auxiliary weights are ``Any`` in the schema: check their shape (the values: validate.py)."""
    for name in AUX_WEIGHT_KEYS:
        value = cfg.resize_shuffle_augmentor[name]
        key = f"resize_shuffle_augmentor.{name}"
        if isinstance(value, DictConfig):
            for k in value:
                if k not in SCHEDULE_KEYS:
                    hint = difflib.get_close_matches(str(k), SCHEDULE_KEYS, n=1)
                    extra = f"; did you mean '{key}.{hint[0]}'?" if hint else ""
                    raise ConfigError(f"unknown config key '{key}.{k}'{extra}")
                if not isinstance(value[k], (int, float)) or isinstance(value[k], bool):
                    raise ConfigError(f"config key '{key}.{k}' must be a number, got {value[k]!r}")
        elif not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be a number or a schedule mapping, got {value!r}")


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> DictConfig:
    """Defaults ← ``path`` (YAML, may be None) ← ``overrides`` (``key=value`` strings)."""
    cfg = OmegaConf.structured(Config)
    if path is not None:
        cfg = _merge(cfg, _read_yaml(path), str(path))
    if overrides:
        cfg = _merge(cfg, parse_overrides(list(overrides)), "command-line overrides")
    _check_interpolations(cfg)
    _check_schedule_keys(cfg)
    validate(cfg)  # every value in its allowed range, before anything is built
    return cfg


def save_config(cfg: DictConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    os.replace(tmp, path)


def to_plain(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
