"""The `fastprompt` command: train | eval | report | sweep | config | demo | bench | world.

Each command parses its arguments here and calls the library (fastprompt.api, .report, .sweep,
.demo, .bench, .world.cli). A FastpromptError is the user's to fix: printed as one line, exit code
2. Anything else is a bug and keeps its traceback. Every command is described in docs/cli.md.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["main", "build_parser", "parse_args"]

OVERRIDES_HELP = (
    "config overrides as key.sub=value, e.g. optim.lr=0.002 data.seeds=[1,2] method.options.n_ctx=4 "
    "(values are YAML; unknown keys are errors that suggest the closest key)"
)

CONFIG_KEYS_HELP = """\
config sections and keys (docs/configs.md; the layers and configs/*.yaml set them; override any with key.sub=value):
  model.name            open_clip model (ViT-B-16-quickgelu, ...; fastprompt-tiny for tests). OpenAI's
                        weights need QuickGELU: the `openai` tag and OpenAI's .pt archives build it
                        under any name; a state-dict file of OpenAI weights needs a *-quickgelu name
  model.pretrained      open_clip tag (openai), a local OpenAI archive (~/.cache/clip/ViT-B-16.pt),
                        a local open_clip state-dict file, or null for random weights
  model.dtype           fp32 | bf16 | fp16 storage of the frozen CLIP
  method.name           zsclip coop cocoop kgcoop maple dpl, each also as dept+<name>
  method.options.*      the method's options (n_ctx, ctx_init, lam, ...; see method_defaults)
  data.dataset          imagenet caltech101 oxford_pets stanford_cars oxford_flowers food101
                        fgvc_aircraft sun397 dtd eurosat ucf101 imagenet_{v2,sketch,a,r} imagefolder
  data.root             the data root in CoOp's layout (for imagefolder: the image tree itself)
  data.shots / seeds    shots per class (16) and seeds ([1, 2, 3]; each seed samples and trains)
  data.cache_dir        few-shot split cache (default <output_dir>/splits)
  data.allow_corrupt    skip unreadable images (counted in the log) instead of stopping
  data.short_side       decoded training-image size (default 8/7 x the model's input size)
  data.crop_scale       random-resized-crop area range ([0.08, 1.0])
  optim.name lr momentum weight_decay head_lr_mult warmup_epochs warmup_lr scheduler grad_clip
  optim.options.*       extra optimiser arguments (e.g. optim.name=adamw optim.options.betas=[0.9,0.99])
  train.epochs batch_size precision(fp32|bf16|fp16) compile device log_every checkpoint_every
        eval_batch_size num_workers progress
        precompute_features feature_batch_size feature_cache text_chunk_size   (speed-ups, all exact)
  protocol.name         base2new | cross_dataset | domain_generalisation | few_shot | train_eval
  protocol.targets      target datasets (cross_dataset, domain_generalisation)
  protocol.shots        shot counts of the few_shot protocol ([1, 2, 4, 8, 16])
  output_dir            run folder; {protocol} {method} {dataset} {shots} {model} are filled in
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastprompt",
        description="Fast prompt tuning of CLIP models (CoOp, CoCoOp, KgCoOp, MaPLe, DPL, DePT).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `fastprompt demo` for complete base-to-new runs on the CPU in a few minutes; `fastprompt COMMAND "
               "--help` for details; the documentation is docs/index.md (docs/cli.md for the commands).",
    )
    parser.add_argument("--traceback", action="store_true", help="show the full Python traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train", help="run a protocol end to end: train, evaluate, write results and the report",
        description="Run the config's protocol end to end (e.g. base-to-new: few-shot sampling, train on the "
                    "base classes, evaluate base and new, HM, for every seed), then write results.json, "
                    "report.md and chart.png in output_dir.",
        epilog=CONFIG_KEYS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("config", nargs="?", metavar="CONFIG",
                       help="a YAML config file (e.g. configs/base2new/dept_coop.yaml, or one `fastprompt config` "
                            "wrote); or compose the published settings with --protocol/--method instead")
    _add_layers(train, method_required=False)
    train.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    again = train.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true",
                       help="train from scratch even if output_dir holds an earlier run (its config, checkpoints, "
                            "logs and results are removed first; the caches stay); without it such a run is refused")
    again.add_argument("--resume", action="store_true",
                       help="continue an interrupted run from its last checkpoint (same output_dir); the "
                            "result equals an uninterrupted run")

    ev = sub.add_parser(
        "eval", help="evaluate the trained checkpoints of a run folder again (no training)",
        description="Rebuild each seed's model from RUN_DIR/config.yaml and its checkpoints, and evaluate "
                    "the protocol again (e.g. after changing train.eval_batch_size or the data root). "
                    "Training-side keys must stay as they were; zero-shot methods (zsclip) need no checkpoint.",
        epilog=CONFIG_KEYS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ev.add_argument("run_dir", help="a run folder written by `fastprompt train` (holds config.yaml)")
    ev.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)

    rep = sub.add_parser(
        "report", help="Markdown table and PNG chart from one or more run folders",
        description="Read results.json of each RUN_DIR and write report.md and chart.png.",
    )
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (each holds results.json)")
    rep.add_argument("--out", default=None, help="folder for report.md and chart.png (default: the first RUN_DIR)")

    sweep = sub.add_parser(
        "sweep", help="every (method, dataset, seed) of a protocol: skips finished runs, resumes interrupted ones",
        description="Run every (method, dataset, seed) that SWEEP.yaml lists (protocol, methods, datasets, seeds, "
                    "overrides, output_dir, report_dir; see docs/training.md). Finished seeds are skipped, "
                    "interrupted ones resume from their checkpoint; then each run folder gets results.json and "
                    "the sweep one report.md/chart.png. Rerun the same command after any failure.",
    )
    sweep.add_argument("sweep_file", metavar="SWEEP.yaml", help="sweep file (YAML: protocol, methods, datasets, seeds, overrides)")
    sweep.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP + "; applied to every run")
    sweep.add_argument("--emit-commands", action="store_true",
                       help="print one `fastprompt train ... --resume` line per (method, dataset, seed) for a "
                            "scheduler (e.g. a Slurm array) instead of running; rerun the sweep afterwards to "
                            "aggregate (finished runs are skipped)")

    config = sub.add_parser(
        "config", help="print the config the layers compose (protocol x method x dataset, overrides) as YAML",
        description="Print the published settings of METHOD under PROTOCOL (and DATASET, and key=value overrides) "
                    "as a commented YAML file: what `fastprompt train --protocol P --method M ...` runs. Save it "
                    "to edit it, then `fastprompt train FILE`. The files in the repository's configs/ are this "
                    "output.", epilog=CONFIG_KEYS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_layers(config, method_required=True)
    config.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)

    demo = sub.add_parser(
        "demo", help="base-to-new prompt tuning on a rendered world with a tiny pretrained CLIP, on CPU (minutes)",
        description="Render the world's base-to-new task (docs/world.md), load fastprompt-world with its shipped "
                    "weights, run zero-shot CLIP, CoOp, DePT + CoOp and KgCoOp on the base classes, evaluate base and "
                    "new, and print the Base/New/HM table beside chance and colour-only baselines. Needs no GPU and "
                    "no network. --smoke instead checks the pipeline in seconds on bundled digits with a random CLIP.",
    )
    demo.add_argument("--output-dir", default=None, help="run folder (default: runs/demo, or runs/demo-smoke)")
    from .demo import FAST_METHODS, FAST_OVERRIDES

    demo.add_argument("--fast", action="store_true",
                      help=f"{', '.join(FAST_METHODS)} only, one seed and fewer epochs ({' '.join(FAST_OVERRIDES)})")
    demo.add_argument("--methods", default=None, help="comma-separated methods to run instead of the demo's list")
    demo.add_argument("--smoke", action="store_true",
                      help="the pipeline check: DePT + CoOp on bundled digits with a RANDOM CLIP (meaningless "
                           "accuracies, seconds)")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)

    bench = sub.add_parser("bench", help="training throughput: fastprompt vs the official-style path",
                           description="`bench train` measures; `bench report RESULT.json` redraws its chart.")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    _add_bench_train(bench_sub.add_parser(
        "train", help="images/s, step breakdown, peak memory, MFU per method/batch/classes, both styles",
        description="Benchmark training steps of every method in fastprompt's style and the official style "
                    "(fp16 eager, 77-token text, CPU augmentation); JSON and PNG to --out. --smoke runs in seconds on CPU."))
    bench_report = bench_sub.add_parser("report", help="chart (PNG) and table from a bench train JSON")
    bench_report.add_argument("result", help="a JSON written by `fastprompt bench train`")
    bench_report.add_argument("--out", default=None, help="PNG path (default: next to the JSON)")
    from .world.cli import build_parser as world_parser

    world_parser(sub.add_parser(
        "world", help="the rendered world: pretrain its CLIP, export a task as an ImageFolder, list tasks",
        description="fastprompt's offline benchmark: a rendered world of coloured shapes and a tiny CLIP pretrained "
                    "on it (docs/world.md)."))
    return parser


def _add_layers(p: argparse.ArgumentParser, *, method_required: bool) -> None:
    """--protocol / --method / --dataset: the layers a config is composed of (fastprompt.config.compose)."""
    from .config import method_names, protocol_names

    p.add_argument("--protocol", choices=protocol_names(), default=None,
                   help="the protocol's layer (default base2new)")
    p.add_argument("--method", required=method_required, default=None, metavar="METHOD",
                   help="the method's layers: " + " ".join(method_names()))
    p.add_argument("--dataset", default=None, help="data.dataset (cross_dataset and domain_generalisation: the "
                                                   "source; default: the protocol's)")


def _split_config(args) -> tuple[str | None, list[str]]:
    """CONFIG and the overrides; `train key=value ...` with no CONFIG puts the first override in CONFIG."""
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).is_file():
        config, overrides = None, [config, *overrides]
    return config, overrides


def _train_config(args):
    """A CONFIG file, or the layers --protocol/--method/--dataset, then the overrides."""
    from .config import compose_config, load_config
    from .errors import ConfigError

    config, overrides = _split_config(args)
    if config is not None:
        if args.protocol or args.method or args.dataset:
            raise ConfigError("give a CONFIG file or --protocol/--method/--dataset, not both; change single keys of "
                              "a file with key=value (e.g. data.dataset=dtd)")
        return load_config(config, overrides)
    if args.method is None:
        raise ConfigError("name what to train: --method METHOD (and --protocol, default base2new), or a CONFIG file "
                          "(see docs/configs.md)")
    return compose_config(args.protocol or "base2new", args.method, dataset=args.dataset, overrides=overrides)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_bench_train(p: argparse.ArgumentParser) -> None:
    """The options of `fastprompt bench train` (fastprompt.bench.BenchOptions)."""
    from .bench import STYLES

    p.add_argument("--smoke", action="store_true", help="CPU smoke mode: fastprompt-tiny, 2 steps, coop and dept+coop")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON and the PNG chart")
    p.add_argument("--model", default=None, help="open_clip model (default ViT-B-16; smoke: fastprompt-tiny)")
    p.add_argument("--methods", nargs="+", default=None, help="methods (default: all five, each with and without dept+)")
    p.add_argument("--batches", nargs="+", type=_positive_int, default=None, help="batch sizes (default 4 32 128)")
    p.add_argument("--classes", nargs="+", type=_positive_int, default=None, help="class counts (default 50 500 1000)")
    p.add_argument("--styles", nargs="+", choices=STYLES, default=list(STYLES),
                   help="what to measure (default both; `--style official` alone: the baseline only)")
    p.add_argument("--steps", type=_positive_int, default=None, help="measured steps per configuration")
    p.add_argument("--repeats", type=_positive_int, default=None,
                   help="measured passes per configuration, the median reported (default 3; smoke 1)")
    p.add_argument("--compile", action="store_true",
                   help="fast path: torch.compile the encoder trunks (dynamic class count) for the images/s pass")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="with --compile on a GPU: replay the compiled trunks as CUDA graphs (launch-bound steps)")
    p.add_argument("--text-chunk-size", type=_positive_int, default=None, help="fast path: prompts per text-encoder chunk")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-steps", action="store_true", help="skip the per-step grid (with --run / --max-batch)")
    p.add_argument("--run", nargs="*", default=None, metavar="METHOD",
                   help="also time whole base-to-new runs of these methods in both styles (default dept+coop dept+maple)")
    p.add_argument("--run-classes", type=_positive_int, default=None, help="base classes of the whole run (default 500; smoke 3)")
    p.add_argument("--run-shots", type=_positive_int, default=None, help="shots per class (default 16; smoke 2)")
    p.add_argument("--run-epochs", type=_positive_int, default=None, help="epochs (default 10; smoke 1)")
    p.add_argument("--run-test-per-class", type=_positive_int, default=None, help="test images per class (default 50; smoke 2)")
    p.add_argument("--max-batch", nargs="*", default=None, metavar="METHOD",
                   help="largest batch that fits, both styles, at the largest class count (GPU)")
    p.add_argument("--precompute", nargs="*", default=None, metavar="METHOD",
                   help="fast steps with the no-grad image features encoded ahead vs in each step, the measurement "
                        "behind train.precompute_features=auto (default coop)")
    p.add_argument("--feature-batch", type=_positive_int, default=None,
                   help="images per no-grad feature batch (train.feature_batch_size; default 512; smoke 8)")
    p.add_argument("--vision-mfu", nargs="*", default=None, metavar="METHOD",
                   help="MFU of the prompted image encoder's forward+backward alone at the largest batch "
                        "(default maple dpl)")


def _print_summary(results: dict, out: Path) -> None:
    from .report import markdown_table, write_report

    md, chart = write_report([out])
    print("\n" + markdown_table([results]))
    runs = results.get("runs", [])
    rates = [r["train"]["images_per_s"] for r in runs if r.get("train", {}).get("images_per_s")]
    if rates:
        print(f"training throughput {sum(rates) / len(rates):.1f} images/s on {results['device']}")
    print(f"wall time {results['wall_seconds']:.0f} s; results in {out}/results.json, table {md}, chart {chart}")


def _train(args) -> None:
    from . import api, distributed

    cfg = _train_config(args)
    results = api.train(cfg, resume=args.resume, overwrite=args.overwrite)
    if distributed.is_main():
        _print_summary(results, Path(cfg.output_dir))


def _eval(args) -> None:
    from . import api, distributed

    results = api.evaluate(args.run_dir, args.overrides)
    if distributed.is_main():
        _print_summary(results, Path(args.run_dir))


def _report(args) -> None:
    from .report import load_results, markdown_table, write_report

    md, chart = write_report(args.run_dirs, args.out)
    print(markdown_table(load_results(args.run_dirs)))
    print(f"wrote {md} and {chart}")


def _bench(args) -> None:
    import dataclasses

    from .bench import BenchOptions, redraw, run_bench

    if args.bench_command == "train":
        run_bench(BenchOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchOptions)}))
    else:
        table, chart = redraw(args.result, args.out)
        print(table)
        print(f"wrote {chart}")


def _sweep(args) -> None:
    from . import distributed
    from .report import load_results, markdown_table
    from .sweep import emit_commands, expand, load_sweep, run_sweep

    sweep = load_sweep(args.sweep_file, args.overrides)
    if args.emit_commands:
        lines = emit_commands(sweep)
        print("\n".join(lines))
        print(f"# {len(lines)} runs; when they are done, `fastprompt sweep {args.sweep_file}` writes the table",
              file=sys.stderr)
        return
    runs = expand(sweep)
    distributed.init_from_env(runs[0].config().train.device)  # under torchrun: every run uses all ranks
    rows, md = run_sweep(sweep)
    if not distributed.is_main():
        return
    print("\n" + markdown_table(load_results([r["output_dir"] for r in rows])))
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ran", "resumed", "finished")}
    print(f"{len(rows)} run folders: {counts['ran']} ran, {counts['resumed']} resumed, {counts['finished']} already "
          f"finished; report {md}")


def _config(args) -> None:
    from .config.published import published_text

    print(published_text(args.protocol or "base2new", args.method, dataset=args.dataset, overrides=args.overrides),
          end="")


def _world(args) -> None:
    from .world.cli import main as world_main

    world_main(args)


def _demo(args) -> None:
    from .demo import run_demo, run_smoke
    from .errors import ConfigError

    if args.smoke:
        if args.fast or args.methods:
            raise ConfigError("--smoke runs DePT + CoOp on digits only; drop --fast/--methods")
        run_smoke(args.output_dir, args.overrides)
        return
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else None
    run_demo(args.output_dir, args.overrides, fast=args.fast, methods=methods)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; `key=value` overrides may also stand after options (argparse alone would
    take them only before the first option that follows CONFIG)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from . import distributed
    from .errors import FastpromptError
    from .training import TrainingInterrupted

    handler = {"train": _train, "eval": _eval, "report": _report, "demo": _demo, "bench": _bench,
               "sweep": _sweep, "config": _config, "world": _world}[args.command]
    from .atomic_io import WRITE_ONLY_ERRNOS, cannot_write

    try:
        try:
            handler(args)
        except OSError as exc:
            if isinstance(exc, FastpromptError) or exc.errno not in WRITE_ONLY_ERRNOS:
                raise
            # A write outside fastprompt's own writers (a library's cache, ...) met a full or read-only disk.
            raise cannot_write(exc.filename or "a file", exc) from exc
    except FastpromptError as exc:  # the user's input: say what is wrong, no traceback; a bug keeps its traceback
        if args.traceback or os.environ.get("FASTPROMPT_TRACEBACK"):
            raise
        where = f" (rank {distributed.rank()})" if distributed.is_distributed() else ""
        print(f"fastprompt {args.command}: error{where}: {exc}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:  # SIGTERM/SIGINT: a checkpoint was saved first
        if distributed.is_main():
            print(f"\nfastprompt {args.command}: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        again = ("rerun the same command with --resume to continue from the last checkpoint"
                 if args.command in ("train", "sweep") else "nothing was lost; rerun the command")
        print(f"\ninterrupted; {again}", file=sys.stderr)
        return 130
    finally:
        distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
