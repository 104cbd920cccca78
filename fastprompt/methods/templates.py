"""The hand-written prompt of each benchmark dataset, as CoOp published them (its CUSTOM_TEMPLATES).

Zero-shot CLIP classifies with them, KgCoOp pulls its prompts towards their features, and DPL's
vision-only variant uses them as its text side. Other datasets (users' ImageFolder trees) get the
generic template.
"""
from __future__ import annotations

GENERIC_TEMPLATE = "a photo of a {}."

DATASET_TEMPLATES = {
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


def template_for(dataset: str) -> str:
    return DATASET_TEMPLATES.get(dataset, GENERIC_TEMPLATE)
