"""`fastprompt demo`: base-to-new prompt tuning on the rendered world, end to end on the CPU.

It renders the world's base-to-new task (fastprompt/world) into the run folder, loads
`fastprompt-world` with the weights that ship with the package (a tiny CLIP pretrained on that
world, nothing downloaded), and runs zero-shot CLIP and the prompt methods through the same
protocol code as a real run: few-shot sampling, train on the base classes, evaluate base and new,
HM, seeds averaged; then one table and one chart with chance and colour-only baselines.

`fastprompt demo --smoke` is the old pipeline check: scikit-learn's digits and a randomly
initialised fastprompt-tiny (accuracies there mean nothing; it only shows that everything runs).
"""
from __future__ import annotations

import copy
import textwrap
import time
from pathlib import Path

from .atomic_io import writing
from .config import Config, config_from_dict, apply_overrides
from .errors import RunFolderError
from .run_folder import CHECKPOINTS, REPORT_FILES, RESULTS_FILE, RunFolder

__all__ = ["DEMO_SETTINGS", "DEMO_METHODS", "FAST_OVERRIDES", "FAST_METHODS", "SMOKE_SETTINGS", "demo_config",
           "smoke_config", "run_demo", "run_smoke"]

# The split (docs/world.md, "Choosing the split"): new classes are colours no base class names, and the
# colour cast costs zero-shot base accuracy that a method can win back.
DEMO_DATASET = "world_by_colour_cast"

# The demo's settings for one method; configs/demo.yaml holds the same (a test keeps the two equal).
# The published optimiser (SGD lr 0.0035, batch 4, 10 epochs, seeds 1 2 3) with 8 shots instead of 16,
# half the training steps: the demo's four methods take about 2.5 minutes on 2 CPU cores.
DEMO_SETTINGS: dict = {
    "model": {"name": "fastprompt-world", "pretrained": "world", "dtype": "fp32"},
    "method": {"name": "dept+coop", "options": {}},
    # Objects are small and near the centre of a 32 px image: large crops only.
    "data": {"dataset": DEMO_DATASET, "root": "runs/demo/data", "cache_dir": "runs/demo/cache", "shots": 8,
             "seeds": [1, 2, 3], "crop_scale": [0.8, 1.0]},
    "optim": {"name": "sgd", "lr": 0.0035, "warmup_epochs": 1, "warmup_lr": 1e-5},
    "train": {"epochs": 10, "batch_size": 4, "precision": "fp32", "device": "auto", "num_workers": 0,
              "eval_batch_size": 256},
    "protocol": {"name": "base2new"},
    "output_dir": "runs/demo/dept_coop",
}
# Run in this order, each in its own folder <output_dir>/<method with + as _>; `--methods` runs others
# (maple, dpl, dept+kgcoop, ...) with the same settings, deep prompts clipped to the model's layers.
DEMO_METHODS = ("zsclip", "coop", "dept+coop", "kgcoop")

# `fastprompt demo --fast`: a quicker look (three methods, one seed, fewer epochs).
FAST_OVERRIDES = ["data.seeds=[1]", "train.epochs=4"]
FAST_METHODS = ("zsclip", "coop", "dept+coop")

# `fastprompt demo --smoke`: the pipeline on bundled digits with a random CLIP (no meaning, seconds).
SMOKE_SETTINGS: dict = {
    "model": {"name": "fastprompt-tiny", "pretrained": None, "dtype": "fp32"},
    "method": {"name": "dept+coop", "options": {}},
    # Digits are small and centred: crops below 90% of the image cut strokes away.
    "data": {"dataset": "imagefolder", "root": "runs/demo-smoke/data", "shots": 16, "seeds": [1],
             "crop_scale": [0.9, 1.0]},
    # A random backbone needs a larger step than CLIP weights.
    "optim": {"name": "sgd", "lr": 0.05, "warmup_epochs": 1, "warmup_lr": 1e-5},
    "train": {"epochs": 3, "batch_size": 8, "precision": "fp32", "device": "auto", "num_workers": 0,
              "eval_batch_size": 128},
    "protocol": {"name": "base2new"},
    "output_dir": "runs/demo-smoke",
}


def _folder(method: str) -> str:
    return method.replace("+", "_")


def _tower_layers(model: str) -> int:
    """The depth of the shallower tower of open_clip model `model` (12 when its config does not say)."""
    import open_clip

    from .clip import TINY_MODEL  # noqa: F401  (importing fastprompt.clip registers fastprompt's model configs)

    config = open_clip.get_model_config(model) or {}
    return min(config.get("vision_cfg", {}).get("layers", 12), config.get("text_cfg", {}).get("layers", 12))


def demo_config(output_dir: str | Path | None = None, overrides: list[str] = (), fast: bool = False,
                method: str = "dept+coop") -> Config:
    """The config of one demo method; its run folder is <output_dir>/<method>, data and caches are shared."""
    from .methods import depths_within

    data = copy.deepcopy(DEMO_SETTINGS)
    root = Path(output_dir) if output_dir is not None else Path(data["output_dir"]).parent
    data["output_dir"] = str(root / _folder(method))
    data["method"]["name"] = method
    # Deep prompts (MaPLe, DPL, IVLP, PromptSRC) no deeper than the model's towers (the world CLIP's text has 2 layers).
    data["method"]["options"] = depths_within(method, _tower_layers(data["model"]["name"]))
    data["data"]["root"] = str(root / "data")
    data["data"]["cache_dir"] = str(root / "cache")
    data = apply_overrides(data, [*(FAST_OVERRIDES if fast else []), *overrides])
    return config_from_dict(data)


def smoke_config(output_dir: str | Path | None = None, overrides: list[str] = ()) -> Config:
    data = copy.deepcopy(SMOKE_SETTINGS)
    if output_dir is not None:
        data["output_dir"] = str(output_dir)
    data["data"]["root"] = str(Path(data["output_dir"]) / "data")
    return config_from_dict(apply_overrides(data, list(overrides)))


def _size(path: Path) -> str:
    n = path.stat().st_size
    return f"{n / 1024:.0f} KB" if n < 1024**2 else f"{n / 1024**2:.1f} MB"


def _single_thread_on_cpu(cfg: Config) -> None:
    import torch

    if cfg.train.device in ("cpu", "auto") and not torch.cuda.is_available():
        # The tiny models' ops are too small to split across cores: a second thread only spins
        # (10x slower when another process shares the CPU), and results do not depend on it.
        torch.set_num_threads(1)


def _runs_under(out: Path) -> set[Path]:
    """The run folders at or below `out` that hold a run (results.json, or a seed's checkpoint)."""
    return ({p.parent for p in out.glob(f"**/{RESULTS_FILE}")}
            | {p.parent.parent.parent for p in out.glob(f"**/{CHECKPOINTS}/latest")})


def _is_demo_run(folder: Path, out: Path, data_root: str) -> bool:
    """A method folder an earlier demo wrote: <out>/<method> recorded with the demo's data root."""
    recorded = RunFolder(folder).recorded_config() if folder.parent == out else None
    return (recorded is not None and recorded["data"]["root"] == data_root
            and folder.name == _folder(recorded["method"]["name"]))


def run_demo(output_dir: str | Path | None = None, overrides: list[str] = (), fast: bool = False,
             methods: tuple[str, ...] | None = None, say=print) -> list[dict]:
    """Every method of the demo on the world's base-to-new task; returns their results. The demo's
    folder holds one run folder per method; an earlier demo there is replaced, any other run refused."""
    start = time.perf_counter()
    methods = tuple(methods or (FAST_METHODS if fast else DEMO_METHODS))
    configs = [demo_config(output_dir, overrides, fast, m) for m in methods]
    _single_thread_on_cpu(configs[0])
    out = Path(configs[0].output_dir).parent
    folder = RunFolder(out)

    def only_a_demo_is_replaced() -> None:  # under the folder's lock
        others = sorted(f for f in _runs_under(out) if not _is_demo_run(f, out, configs[0].data.root))
        if others:
            raise RunFolderError(f"{out} holds a run that is not a demo's ({others[0]}); the demo would replace it: "
                                 "choose another --output-dir")
        for cfg in configs:
            RunFolder(cfg.output_dir).clear_run()
        with writing(out):
            for name in REPORT_FILES:
                (out / name).unlink(missing_ok=True)

    with folder.locked("fastprompt demo", check=only_a_demo_is_replaced, say=say):
        return _demo(configs, out, start, say)


def _demo(configs: list[Config], out: Path, start: float, say) -> list[dict]:
    from .clip import load_clip
    from .data import load_dataset
    from .protocols import run_protocol
    from .report import draw_chart, markdown_table
    from .world.baselines import baseline_results
    from .world.catalog import dataset_names
    from .world.tasks import get_task

    first = configs[0]
    methods = [cfg.method.name for cfg in configs]
    task_name, domain = dataset_names()[first.data.dataset]
    task = get_task(task_name)
    n_base = (len(task.classes) + 1) // 2
    say("fastprompt demo: base-to-new prompt tuning on a rendered world, end to end on this machine\n")
    with writing(first.data.root):
        splits = load_dataset(first.data.dataset, first.data.root)
    images = len(splits.train) + len(splits.val) + len(splits.test)
    say(f"data:  {first.data.dataset} (docs/world.md): {images:,} images rendered in the '{domain}' domain into "
        f"{first.data.root}/world/{domain}")
    say(textwrap.fill(f"task '{task_name}': {task.description}", width=100, initial_indent=" " * 7,
                      subsequent_indent=" " * 7))
    say(f"       {n_base} base classes (trained on, {first.data.shots} shots each), {len(task.classes) - n_base} new "
        "(never seen)")
    if first.model.pretrained == DEMO_SETTINGS["model"]["pretrained"]:
        size = sum(p.numel() for p in load_clip(first.model.name, first.model.pretrained).model.parameters())
        say(f"model: {first.model.name} with the weights shipped in the package ('{first.model.pretrained}'): a "
            f"{size / 1e6:.1f}M-parameter CLIP")
        say("       pretrained on this world's clean domain (fastprompt world pretrain); nothing downloaded")
    else:
        say(f"model: {first.model.name}, weights: {first.model.pretrained or 'random init'}")
    say(f"runs:  {', '.join(methods)}; {first.train.epochs} epochs, batch {first.train.batch_size}, "
        f"seeds {', '.join(map(str, first.data.seeds))}\n")
    results = []
    for cfg in configs:
        say(f"{cfg.method.name}:")
        results.append(run_protocol(cfg, say=lambda m: say("  " + m)))
    reference = baseline_results(task, results[0])
    table = markdown_table([*results, *reference])
    with writing(out / "report.md"):
        (out / "report.md").write_text(table + "\n![chart](chart.png)\n")
    chart = draw_chart([*results, *reference], out / "chart.png")
    wall = time.perf_counter() - start

    say("\n" + table)
    say(f"whole demo {wall:.0f} s on {results[0]['device']}\n")
    say(f"run folder: {out}")
    say(f"  report.md, chart.png   the table and the chart ({chart})")
    say("  <method>/config.yaml   each method's resolved config (rerun one: fastprompt train "
        f"{out / _folder(methods[-1]) / 'config.yaml'} --overwrite)")
    say("  <method>/results.json  per-seed and averaged Base / New / HM; <method>/seed<k>/ logs and checkpoints")
    say(f"  data/world/{domain}/      the images (an ImageFolder tree; `fastprompt world export` writes one task alone)\n")
    say("READ WITH CARE: this is a synthetic world of coloured shapes and a tiny CLIP trained on it, not the")
    say("papers' datasets and not OpenAI's CLIP; it shows how methods trade base against new accuracy here, not")
    say("what they score on real images (docs/world.md). Real figures need real weights and data, e.g.:")
    say("  fastprompt train configs/base2new/dept_coop.yaml model.pretrained=openai \\")
    say("      data.root=/path/to/data data.dataset=caltech101")
    return results


def run_smoke(output_dir: str | Path | None = None, overrides: list[str] = (), say=print) -> dict:
    """DePT + CoOp on bundled digits with a random CLIP: checks the pipeline, says nothing about methods."""
    start = time.perf_counter()
    cfg = smoke_config(output_dir, overrides)
    _single_thread_on_cpu(cfg)
    out = Path(cfg.output_dir)
    folder = RunFolder(out)

    def only_a_demo_is_replaced() -> None:  # under the folder's lock
        earlier, recorded = folder.earlier_run(), folder.recorded_config()
        if earlier is not None and (recorded is None or recorded["data"]["root"] != cfg.data.root):
            raise RunFolderError(f"{out} holds a run that is not a demo's ({earlier}); the demo would replace it: "
                                 "choose another --output-dir")
        folder.clear_run()

    with folder.locked("fastprompt demo --smoke", check=only_a_demo_is_replaced, say=say):
        return _smoke(cfg, out, start, say)


def _smoke(cfg: Config, out: Path, start: float, say) -> dict:
    from .data import write_digits_imagefolder
    from .protocols import run_protocol
    from .report import markdown_table, write_report

    say("fastprompt demo --smoke: the pipeline end to end (DePT + CoOp) with a RANDOM CLIP on bundled digits\n")
    with writing(cfg.data.root):
        root = write_digits_imagefolder(cfg.data.root, image_size=32)
    say(f"data:  scikit-learn's handwritten digits, 1,797 real images, written as an ImageFolder to {root}")
    say(f"model: {cfg.model.name}, a small open_clip ViT with random weights; {cfg.train.epochs} epochs, "
        f"seeds {', '.join(map(str, cfg.data.seeds))}\n")
    results = run_protocol(cfg, say=lambda m: say("  " + m))
    md, chart = write_report([out])
    seed_dir = out / f"seed{cfg.data.seeds[0]}"
    ckpt = sorted((seed_dir / CHECKPOINTS).glob("step-*"))[-1]
    say("\n" + markdown_table([results]))
    say(f"whole run {time.perf_counter() - start:.0f} s; run folder {out} (report.md, chart.png, results.json, "
        f"{seed_dir.name}/checkpoints/{ckpt.name}/model.safetensors {_size(ckpt / 'model.safetensors')})\n")
    say("The CLIP weights are random: chance is 20% on 5 classes and these numbers mean nothing beyond")
    say("'it runs'. `fastprompt demo` (without --smoke) runs the methods on the world with pretrained weights;")
    say("for real results use real weights and data, e.g. model.pretrained=openai data.dataset=caltech101.")
    return results
