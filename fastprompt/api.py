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
from .config import Config, ConfigError, load_config
from .protocols import Say, check_data_root, run_protocol
from .run_folder import RunFolder

__all__ = ["train", "evaluate"]


def train(config: Config | str | Path, overrides: Sequence[str] = (), *, resume: bool = False,
          overwrite: bool = False, say: Say = print) -> dict:
    """Run the config's protocol end to end: every seed trained, evaluated and written to the run
    folder (cfg.output_dir), then results.json. `config` is a Config or a YAML file (with
    `key=value` overrides). A folder that already holds a run is refused unless `resume` (continue
    it from its checkpoints; finished seeds are kept) or `overwrite` (train it again)."""
    if resume and overwrite:
        raise ConfigError("resume and overwrite exclude each other: --resume continues the run in output_dir, "
                          "--overwrite replaces it; give one")
    if isinstance(config, Config):
        if overrides:
            raise TypeError("overrides apply to a config file; give a Config its values when it is made "
                            "(load_config or compose_config with overrides=...)")
        cfg = config
    else:
        cfg = load_config(config, list(overrides))
    distributed.init_from_env(cfg.train.device)
    folder = RunFolder(cfg.output_dir)

    def before_anything() -> None:  # under the lock: nothing may start in the folder between the look and the run
        if overwrite:
            check_data_root(cfg)  # a typo in data.root must not cost the earlier run
            folder.clear_run()
        elif not resume:
            folder.refuse_earlier_run()
        elif folder.earlier_run() is None:
            say(f"--resume: {folder.root} holds no earlier run to continue; starting it")

    command = "fastprompt train" + (" --resume" if resume else " --overwrite" if overwrite else "")
    with folder.locked(command, shared=resume, check=before_anything, say=say):
        return run_protocol(cfg, resume=resume, say=say)


def evaluate(run_dir: str | Path, overrides: Sequence[str] = (), *, say: Say = print) -> dict:
    """Test the trained checkpoints of a run folder again (no training) with its own config.yaml;
    `overrides` may change what does not alter the trained model (data.root, train.eval_batch_size,
    ...). results.json gets the new accuracies and keeps what training recorded (its steps, time,
    images/s, losses), the evaluation's own under "eval"."""
    folder = RunFolder(run_dir)
    if any(o.split("=", 1)[0].strip() == "output_dir" for o in overrides):
        raise ConfigError(f"eval evaluates the run folder it is given ({run_dir}) and writes there: drop the "
                          "output_dir=... override (to evaluate another run, pass its folder as RUN_DIR)")
    cfg = load_config(folder.require_config(), [*overrides, f"output_dir={run_dir}"])
    distributed.init_from_env(cfg.train.device)
    with folder.locked("fastprompt eval", say=say):
        return run_protocol(cfg, train=False, say=say)
