"""`fastprompt world pretrain | export | info`: the world's command line (cli.py mounts it)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_OUT = "runs/world/fastprompt-world.safetensors"


def build_parser(parser: argparse.ArgumentParser) -> None:
    from .domains import DOMAINS
    from .pretrain import Recipe
    from .tasks import TASKS

    sub = parser.add_subparsers(dest="world_command", required=True, metavar="WORLD")
    r = Recipe()
    pre = sub.add_parser(
        "pretrain", help="pretrain the world CLIP from a seed (reproduces the shipped fastprompt-world weights)",
        description="Contrastive pretraining of fastprompt-world on freshly rendered images (docs/world.md). "
                    "With the defaults it rebuilds the shipped weights, bit for bit on a CPU with the same torch "
                    "version and thread count (12 minutes on 2 quiet CPU cores, 30 on busy ones; the shipped run's "
                    "record is in fastprompt/weights/fastprompt-world.json). On a shared, busy machine set "
                    "OMP_WAIT_POLICY=PASSIVE: the two threads then stop spinning against other processes (the "
                    "same weights).")
    pre.add_argument("--out", default=DEFAULT_OUT, help=f"weights file to write (default {DEFAULT_OUT}); a JSON record "
                     "of the run is written beside it")
    pre.add_argument("--seed", type=int, default=r.seed, help=f"seed of the init, the images and the captions ({r.seed})")
    pre.add_argument("--steps", type=int, default=r.steps, help=f"optimiser steps ({r.steps})")
    pre.add_argument("--batch-size", type=int, default=r.batch_size, help=f"images per step ({r.batch_size})")
    pre.add_argument("--lr", type=float, default=r.lr, help=f"AdamW peak learning rate ({r.lr})")
    pre.add_argument("--threads", type=int, default=r.threads,
                     help=f"CPU threads ({r.threads}); the result depends on it in the last bits")
    pre.add_argument("--device", default="cpu", help="cpu (bit-reproducible) or cuda (seconds, not bit-identical)")

    exp = sub.add_parser(
        "export", help="write one world task as a plain ImageFolder tree (with classes.txt)",
        description="Render (if needed) and copy one task's images into OUT/{train,val,test}/<class>/*.png with "
                    "OUT/classes.txt in label order: data.dataset=imagefolder data.root=OUT then gives the same "
                    "classes and base/new split as data.dataset=world_<task>[_<domain>].")
    exp.add_argument("out", help="a new folder")
    exp.add_argument("--task", default="by_shape", choices=list(TASKS))
    exp.add_argument("--domain", default="clean", choices=list(DOMAINS))

    sub.add_parser("info", help="the world's tasks, domains, dataset names and the shipped weights' record")


def main(args) -> None:
    {"pretrain": _pretrain, "export": _export, "info": _info}[args.world_command](args)


def _pretrain(args) -> None:
    from dataclasses import replace

    from ..errors import ConfigError
    from ..shipped_weights import SHIPPED, load_packed
    from .pretrain import Recipe, pretrain, save_weights

    for name in ("steps", "batch_size", "threads"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    recipe = replace(Recipe(), seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                     threads=args.threads)
    out = Path(args.out)
    shipped = SHIPPED[("fastprompt-world", "world")]
    # Read before training: --out may be the shipped file itself (rebuilding it in place).
    shipped_digest = load_packed(shipped.file)[1].get("weights_sha256") if shipped.file.is_file() else None
    print(f"pretraining fastprompt-world: {recipe}", flush=True)
    model, record = pretrain(recipe, device=args.device, say=lambda m: print(m, flush=True))
    record = save_weights(model, out, record)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    z = record["zero_shot"]
    print(f"\nwrote {out} ({record['file_bytes'] / 1e6:.2f} MB) in {record['train_seconds']:.0f} s of training "
          f"({record['recipe']['threads']} threads, load average {record['load_average_before'][0]} before, "
          f"{record['load_average_after'][0]} after)")
    print(f"zero-shot 'a photo of a <colour> <shape>.': seen pairs {z['seen']:.2f}% (64-way), held-out pairs "
          f"{z['held_out']:.2f}% (64-way) / {z['held_out_16']:.2f}% (16-way), colour {z['colour']:.2f}%, "
          f"shape {z['shape']:.2f}%")
    if shipped_digest is not None:
        same = shipped_digest == record["weights_sha256"]
        print("identical to the shipped weights, bit for bit" if same else
              "differs from the shipped weights (expected with another recipe, device, thread count or torch)")


def _export(args) -> None:
    from .dataset import export_imagefolder

    out = export_imagefolder(args.out, args.task, args.domain)
    print(f"wrote {out}: {{train,val,test}}/<class>/*.png and classes.txt; use it with "
          f"data.dataset=imagefolder data.root={out}")


def _info(args) -> None:
    from ..shipped_weights import SHIPPED, load_packed
    from .baselines import baselines
    from .catalog import dataset_name
    from .domains import DOMAINS
    from .tasks import TASKS

    print("tasks (data.dataset=world_<task>[_<domain>]; base = the first half of the classes):")
    for t in TASKS.values():
        b = baselines(t)
        print(f"  {t.name:10s} {len(t.classes):2d} classes: {t.description}; chance {b['chance']['base']:.1f}%, "
              f"colour only {b['colour only']['base']:.1f}%")
    print("domains:")
    for name, d in DOMAINS.items():
        print(f"  {name:10s} {d}")
    print(f"e.g. data.dataset={dataset_name('by_shape')} or {dataset_name('by_shape', 'clutter')}")
    w = SHIPPED[("fastprompt-world", "world")]
    if w.file.is_file():
        rec = load_packed(w.file)[1]
        print(f"shipped weights {w.model}/{w.tag}: {w.file} ({w.file.stat().st_size / 1e6:.2f} MB), recipe "
              f"{rec.get('recipe')}, zero-shot {rec.get('zero_shot')}")
