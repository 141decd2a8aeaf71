"""Typed configs: the schema and its loader."""

from wsss.config.load import check_config, config_hash, dump_config, load_config, to_dict
from wsss.config.schema import (
    Config,
    DataConfig,
    EvalConfig,
    MapsConfig,
    MethodConfig,
    ModelConfig,
    PseudoConfig,
    RuntimeConfig,
    ScheduleConfig,
    SegConfig,
    SegModelConfig,
    split_name,
)

__all__ = [
    "split_name",
    "Config", "DataConfig", "EvalConfig", "MapsConfig", "MethodConfig", "ModelConfig", "PseudoConfig",
    "RuntimeConfig", "ScheduleConfig", "SegConfig", "SegModelConfig", "check_config", "config_hash", "dump_config",
    "load_config", "to_dict",
]
