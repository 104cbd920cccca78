"""Configuration: a typed, strict schema (dataclasses; YAML files plus `key.sub=value` overrides)
and configs composed from the shipped layers (protocol x method x dataset, then overrides)."""
from ..errors import ConfigError
from .compose import compose_config, method_names, protocol_names
from .schema import (Config, DataConfig, MethodConfig, ModelConfig, OptimConfig, ProtocolConfig, TrainConfig,
                     apply_overrides, check_method_options, config_from_dict, config_to_dict, load_config,
                     read_yaml, save_config)

__all__ = [
    "ConfigError", "Config", "ModelConfig", "MethodConfig", "DataConfig", "OptimConfig", "TrainConfig",
    "ProtocolConfig", "load_config", "read_yaml",
    "config_from_dict", "config_to_dict", "apply_overrides", "save_config",
    "check_method_options", "compose_config", "method_names", "protocol_names",
]
