"""The hand-written prompt each method uses per benchmark dataset, as its authors' code has it.

Three methods classify with (or are regularised towards) a hand-written template:
- zero-shot CLIP uses CoOp's per-dataset templates (CoOp's zero-shot baseline, `CUSTOM_TEMPLATES`);
- KgCoOp pulls its prompts towards the features of KgCoOp's own table, which equals CoOp's except
  for DescribableTextures ("a photo of a {}, a type of texture." where CoOp has "{} texture.");
  DePT's KgCoOp code uses the same table;
- DPL's vision-only variant (fastprompt's own method) uses CoOp's as its text side.
Datasets outside a table (users' ImageFolder trees, the rendered world) get the generic template.
PromptSRC regularises towards an ensemble of 60 templates, the same for every dataset
(`PROMPTSRC_TEMPLATES`).
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

# PromptSRC's frozen text anchor: the class's CLIP features averaged over these 60 templates (the
# same list for every dataset). They are the first 60 of the 80 ImageNet templates of CLIP's
# prompt-engineering notebook, "a photo of a {}." moved to the front as PromptSRC's list has it.
PROMPTSRC_TEMPLATES = (
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.",
    "the embroidered {}.", "a photo of a hard to see {}.", "a bright photo of a {}.", "a photo of a clean {}.",
    "a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.",
    "the plastic {}.", "a photo of the cool {}.", "a close-up photo of a {}.",
    "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.",
    "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.",
    "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.",
)
