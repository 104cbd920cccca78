"""The hand-written prompt each method uses per benchmark dataset, as its authors' code has it.

Three methods classify with (or are regularised towards) a hand-written template:
- zero-shot CLIP uses CoOp's per-dataset templates (CoOp's zero-shot baseline, `CUSTOM_TEMPLATES`);
- KgCoOp pulls its prompts towards the features of KgCoOp's own table, which equals CoOp's except
  for DescribableTextures ("a photo of a {}, a type of texture." where CoOp has "{} texture.");
  DePT's KgCoOp code uses the same table;
- DPL's vision-only variant (fastprompt's own method) uses CoOp's as its text side.
Datasets outside a table (users' ImageFolder trees, the rendered world) get the generic template.
"""
from __future__ import annotations

GENERIC_TEMPLATE = "a photo of a {}."

# CoOp's zero-shot CLIP templates (keys are fastprompt's dataset names).
COOP_TEMPLATES = {
    "imagenet": GENERIC_TEMPLATE,
    "caltech101": GENERIC_TEMPLATE,
    "oxford_pets": "a photo of a {}, a type of pet.",
    "stanford_cars": GENERIC_TEMPLATE,
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "food101": "a photo of {}, a type of food.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "sun397": GENERIC_TEMPLATE,
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet_v2": GENERIC_TEMPLATE,
    "imagenet_sketch": GENERIC_TEMPLATE,
    "imagenet_a": GENERIC_TEMPLATE,
    "imagenet_r": GENERIC_TEMPLATE,
}

# KgCoOp's hand-crafted anchors (its trainer's table; DePT's KgCoOp trainer holds the same).
KGCOOP_TEMPLATES = {**COOP_TEMPLATES, "dtd": "a photo of a {}, a type of texture."}

# Which table each method's template follows (a DePT variant follows its base method).
METHOD_TEMPLATES = {"zsclip": COOP_TEMPLATES, "kgcoop": KGCOOP_TEMPLATES, "dpl": COOP_TEMPLATES}


def template_for(method: str, dataset: str) -> str:
    """The hand-written template `method` (e.g. "kgcoop" or "dept+kgcoop") uses on `dataset`."""
    base = method.split("+")[-1]
    if base not in METHOD_TEMPLATES:
        raise ValueError(f"method {method!r} has no hand-written template; methods with one: {', '.join(METHOD_TEMPLATES)}")
    return METHOD_TEMPLATES[base].get(dataset, GENERIC_TEMPLATE)
