"""Job configuration: a dataclass tree (`schema`), loaded from TOML and overridden by dotted CLI keys
(`loading`), checked before any rank starts (`checks`, and `matrix`: which features combine). Imports no
torch and nothing else of expertmesh; a checkpoint's config.json is read by `expertmesh.models.hf.load_config`.

Precedence is CLI > file > dataclass defaults. The defaults *are* the default run (`configs/default.toml`
spells them out; a test keeps the two equal)."""

from expertmesh.config.checks import PP_SCHEDULES, check, check_elastic, pp_microbatches
from expertmesh.config.loading import Resolver, apply_overrides, from_dict, load, save
from expertmesh.config.matrix import FEATURES, REFUSED, check_combinations, features_of
from expertmesh.config.schema import (
                                      CheckpointConfig,
                                      ConfigError,
                                      DataConfig,
                                      DiLoCoConfig,
                                      DistillConfig,
                                      DraftHeadConfig,
                                      FSSDPConfig,
                                      JobConfig,
                                      MetricsConfig,
                                      ModelConfig,
                                      MoEConfig,
                                      OptimConfig,
                                      ParallelConfig,
                                      TrainConfig,
                                      suggest,
)

__all__ = ["PP_SCHEDULES", "FEATURES", "REFUSED", "Resolver", "CheckpointConfig", "ConfigError", "DataConfig",
           "DiLoCoConfig", "DistillConfig", "DraftHeadConfig", "FSSDPConfig", "JobConfig", "MetricsConfig",
           "ModelConfig", "MoEConfig",
           "OptimConfig", "ParallelConfig", "TrainConfig", "apply_overrides", "check", "check_combinations",
           "check_elastic", "features_of", "from_dict", "load", "pp_microbatches", "save", "suggest"]
