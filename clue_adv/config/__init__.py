"""The run configuration. schema: the pydantic models, the single source of truth for a run; paths: path fields and
directory names; load: YAML files, merging, `--set` overrides, validation; messages: readable validation errors;
variants: the experiment folder of a `--set` variant. The public names are re-exported here."""

from clue_adv.config.load import (
    apply_override,
    dump_config,
    load_config,
    load_yaml,
    merge,
    merge_dotted,
    parse_config,
    set_dotted,
)
from clue_adv.config.messages import check_key, did_you_mean, format_validation_errors
from clue_adv.config.paths import NAME_MAX, directory_name, expand_path, path_problem, require_nameable
from clue_adv.config.schema import (
    MAX_SEED,
    TASKS,
    ArchitectureConfig,
    CheckpointConfig,
    DataConfig,
    EarlyStoppingConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    StrategyBlock,
)
from clue_adv.config.variants import as_variant, format_value, set_variant_fields, variant_name

__all__ = [
    "MAX_SEED",
    "NAME_MAX",
    "TASKS",
    "ArchitectureConfig",
    "CheckpointConfig",
    "DataConfig",
    "EarlyStoppingConfig",
    "EvalConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "StrategyBlock",
    "apply_override",
    "as_variant",
    "check_key",
    "did_you_mean",
    "directory_name",
    "dump_config",
    "expand_path",
    "format_validation_errors",
    "format_value",
    "load_config",
    "load_yaml",
    "merge",
    "merge_dotted",
    "parse_config",
    "path_problem",
    "require_nameable",
    "set_dotted",
    "set_variant_fields",
    "variant_name",
]
