"""An offline base-to-new benchmark: a rendered world of coloured shapes and a tiny CLIP pretrained on it.

vocabulary.py  colours, shapes, sizes, backgrounds; the 16 (colour, shape) pairs pretraining never shows
domains.py     rendering settings: clean (pretraining) and shifted domains (clutter, jitter, placement, ...)
render.py      vectorised, seeded rendering of one object per 32 px image
scenes.py      random scene attributes
captions.py    caption templates and which captions are true of which images
tasks.py       downstream class lists whose label order is the base/new split
catalog.py     dataset names (`data.dataset=world_<task>[_<domain>]`)
dataset.py     the ImageFolder tree each domain is rendered into, and per-task exports
baselines.py   chance / colour-only / shape-only accuracies of a task's halves
probe.py       zero-shot probe of a world CLIP
pretrain.py    the recipe of the shipped `fastprompt-world` weights
cli.py         `fastprompt world pretrain | export | info`

Nothing here is imported by `import fastprompt`; docs/world.md explains what the benchmark can and
cannot say.
"""
