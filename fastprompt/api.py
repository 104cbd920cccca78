"""Training and evaluation from Python: what `fastprompt train` and `fastprompt eval` do.

    import fastprompt
    cfg = fastprompt.compose_config("base2new", "dept+coop", dataset="caltech101", overrides=["data.root=/data"])
    results = fastprompt.train(cfg)                 # every seed trained and evaluated; results.json written
    again = fastprompt.evaluate(cfg.output_dir)     # the saved checkpoints tested again

Both return the aggregate results (the content of the run folder's results.json). Under torchrun
they join the process group the launcher describes, as the command does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from . import distributed
from .config import Config, load_config
from .protocols import Say, run_protocol
from .run_folder import RunFolder

__all__ = ["train", "evaluate"]


def train(config: Config | str | Path, overrides: Sequence[str] = (), *, resume: bool = False,
          overwrite: bool = False, say: Say = print) -> dict:
    """Run the config's protocol end to end: every seed trained, evaluated and written to the run
    folder (cfg.output_dir), then results.json. `config` is a Config or a YAML file (with
    `key=value` overrides). A folder that already holds a run is refused unless `resume` (continue
    it from its checkpoints; finished seeds are kept) or `overwrite` (train it again)."""
    if isinstance(config, Config):
        if overrides:
            raise TypeError("overrides apply to a config file; give a Config its values when it is made "
                            "(load_config or compose_config with overrides=...)")
        cfg = config
    else:
        cfg = load_config(config, list(overrides))
    if not (resume or overwrite):
        RunFolder(cfg.output_dir).refuse_earlier_run()
    distributed.init_from_env(cfg.train.device)
    return run_protocol(cfg, resume=resume, say=say)


def evaluate(run_dir: str | Path, overrides: Sequence[str] = (), *, say: Say = print) -> dict:
    """Test the trained checkpoints of a run folder again (no training) with its own config.yaml;
    `overrides` may change what does not alter the trained model (data.root, train.eval_batch_size,
    ...), and results.json is written again."""
    folder = RunFolder(run_dir)
    cfg = load_config(folder.require_config(), [f"output_dir={run_dir}", *overrides])
    distributed.init_from_env(cfg.train.device)
    return run_protocol(cfg, train=False, say=say)
