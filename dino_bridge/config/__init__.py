"""The config tree (OmegaConf over dataclasses): schema, loading with overrides, feature checks."""

from .load import ConfigError, load_config, parse_overrides, save_config, to_plain
from .schema import Config

__all__ = ["Config", "ConfigError", "load_config", "parse_overrides", "save_config", "to_plain"]
