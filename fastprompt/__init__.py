"""fastprompt: fast prompt tuning of CLIP models (DePT, DPL and their base methods).

The model side: `load_clip` (a frozen open_clip backbone) and `build_model` (a prompt method over
it). The training side: `compose_config` (the shipped layers: protocol x method x dataset, then
`key=value` overrides) or `load_config` (a YAML file and overrides), `train` (a protocol
end to end: every seed trained, evaluated and written to its run folder), `evaluate` (a run folder's
checkpoints tested again) and `run_protocol` (the same without the run-folder guard). Every error
meant for the user is a `FastpromptError`.
"""
__version__ = "0.1.0"

from fastprompt.api import evaluate, train  # noqa: E402
from fastprompt.clip import ClipBundle, load_clip  # noqa: E402
from fastprompt.config import Config, compose_config, load_config  # noqa: E402
from fastprompt.errors import (CheckpointError, ConfigError, DatasetError, DivergenceError,  # noqa: E402
                               FastpromptError)
from fastprompt.methods import METHOD_NAMES, build_model, method_defaults  # noqa: E402
from fastprompt.protocols import run_protocol  # noqa: E402

__all__ = [
    "ClipBundle", "load_clip", "build_model", "method_defaults", "METHOD_NAMES",
    "Config", "load_config", "compose_config", "train", "evaluate", "run_protocol",
    "FastpromptError", "ConfigError", "DatasetError", "CheckpointError", "DivergenceError",
    "__version__",
]
