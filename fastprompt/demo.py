"""`fastprompt demo`: a complete base-to-new run (DePT + CoOp) on this machine, no GPU, no network.

It writes scikit-learn's bundled handwritten digits (1,797 real 8x8 images, classes "zero" ..
"nine") as an ImageFolder inside the run folder, builds a small open_clip ViT with random
weights, and runs the same protocol code as a real run: few-shot sampling, train on the base
classes (zero..four), evaluate base and new (five..nine), HM, seeds averaged, then the report.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

from .atomic_io import writing
from .config import Config, config_from_dict, apply_overrides
from .errors import RunFolderError
from .run_folder import RunFolder

__all__ = ["DEMO_SETTINGS", "FAST_OVERRIDES", "demo_config", "run_demo"]

# The demo's settings; configs/demo.yaml holds the same (a test keeps the two equal).
DEMO_SETTINGS: dict = {
    "model": {"name": "fastprompt-tiny", "pretrained": None, "dtype": "fp32"},
    "method": {"name": "dept+coop", "options": {}},
    # Digits are small and centred: crops below 90% of the image cut strokes away.
    "data": {"dataset": "imagefolder", "root": "runs/demo/data", "shots": 16, "seeds": [1, 2, 3],
             "crop_scale": [0.9, 1.0]},
    # The paper's optimiser; a random backbone needs a larger step and more epochs than CLIP weights.
    "optim": {"name": "sgd", "lr": 0.05, "warmup_epochs": 1, "warmup_lr": 1e-5},
    "train": {"epochs": 20, "batch_size": 8, "precision": "fp32", "device": "auto", "num_workers": 0,
              "eval_batch_size": 128},
    "protocol": {"name": "base2new"},
    "output_dir": "runs/demo",
}

# `fastprompt demo --fast` (CI): one seed, three epochs.
FAST_OVERRIDES = ["data.seeds=[1]", "train.epochs=3"]


def demo_config(output_dir: str | Path | None = None, overrides: list[str] = (), fast: bool = False) -> Config:
    data = copy.deepcopy(DEMO_SETTINGS)
    if output_dir is not None:
        data["output_dir"] = str(output_dir)
    data["data"]["root"] = str(Path(data["output_dir"]) / "data")
    data = apply_overrides(data, [*(FAST_OVERRIDES if fast else []), *overrides])
    return config_from_dict(data)


def _size(path: Path) -> str:
    n = path.stat().st_size
    return f"{n / 1024:.0f} KB" if n < 1024**2 else f"{n / 1024**2:.1f} MB"


def run_demo(output_dir: str | Path | None = None, overrides: list[str] = (), fast: bool = False,
             say=print) -> dict:
    import torch

    start = time.perf_counter()
    cfg = demo_config(output_dir, overrides, fast)
    if cfg.train.device in ("cpu", "auto") and not torch.cuda.is_available():
        # The tiny model's ops are too small to split across cores: a second thread only spins
        # (10x slower when another process shares the CPU), and results do not depend on it.
        torch.set_num_threads(1)
    out = Path(cfg.output_dir)
    folder = RunFolder(out)

    def only_a_demo_is_replaced() -> None:  # under the folder's lock
        earlier, recorded = folder.earlier_run(), folder.recorded_config()
        if earlier is not None and (recorded is None or recorded["data"]["root"] != cfg.data.root):
            raise RunFolderError(f"{out} holds a run that is not a demo's ({earlier}); the demo would replace it: "
                                 "choose another --output-dir")
        folder.clear_run()

    with folder.locked("fastprompt demo", check=only_a_demo_is_replaced, say=say):
        return _demo(cfg, out, start, say)


def _demo(cfg: Config, out: Path, start: float, say) -> dict:
    from .data import write_digits_imagefolder
    from .protocols import run_protocol
    from .report import markdown_table, write_report

    say("fastprompt demo: base-to-new prompt tuning with DePT + CoOp, end to end on this machine\n")
    with writing(cfg.data.root):
        root = write_digits_imagefolder(cfg.data.root, image_size=32)
    say(f"data:  scikit-learn's handwritten digits, 1,797 real images, written as an ImageFolder to {root}")
    say("       base classes zero..four (trained on, 16 shots each), new classes five..nine (never seen)")
    say(f"model: {cfg.model.name}, a small open_clip ViT with RANDOM weights (nothing downloaded)")
    say(f"run:   {cfg.method.name}, {cfg.train.epochs} epochs, batch {cfg.train.batch_size}, "
        f"seeds {', '.join(map(str, cfg.data.seeds))}\n")
    results = run_protocol(cfg, say=lambda m: say("  " + m))
    md, chart = write_report([out])
    wall = time.perf_counter() - start

    train_rate = sum(r["train"]["images_per_s"] for r in results["runs"]) / len(results["runs"])
    eval_rate = sum(r["eval_images_per_s"] for r in results["runs"]) / len(results["runs"])
    seed_dir = out / f"seed{cfg.data.seeds[0]}"
    ckpt = sorted((seed_dir / "checkpoints").glob("step-*"))[-1]
    say("\n" + markdown_table([results]))
    say(f"throughput: training {train_rate:.1f} images/s, evaluation {eval_rate:.1f} images/s "
        f"on {results['device']}; whole demo {wall:.0f} s\n")
    say(f"run folder: {out}")
    say("  config.yaml        the resolved config (rerun it: fastprompt train " + str(out / "config.yaml")
        + " --overwrite)")
    say("  results.json       per-seed and averaged Base / New / HM")
    say(f"  report.md, chart.png   the table and the chart ({chart})")
    say(f"  {seed_dir.name}/train.log, {seed_dir.name}/metrics.jsonl   log and per-step metrics")
    say(f"  {seed_dir.name}/checkpoints/{ckpt.name}/model.safetensors ({_size(ckpt / 'model.safetensors')}, "
        "the trained prompt and CAT head only, no CLIP weights)\n")
    say("NOTE: the CLIP weights here are random, so these accuracies only show that the pipeline works end")
    say("to end (chance is 20% on 5 classes); they say nothing about DePT or CoOp. For real results, use")
    say("pretrained weights and a real dataset, e.g.:")
    say("  fastprompt train --protocol base2new --method dept+coop --dataset caltech101 \\")
    say("      model.pretrained=openai data.root=/path/to/data")
    say("(model.pretrained takes an open_clip tag or a local checkpoint file; data.root the CoOp layout,")
    say(" or data.dataset=imagefolder with data.root=/path/to/tree/{train,val,test}/<class>/*.jpg;")
    say(" see docs/index.md)")
    results["demo_wall_seconds"] = round(wall, 1)
    return results
