"""The hand-written template of every (method, dataset): pinned to the authors' code.

Zero-shot CLIP follows CoOp's zero-shot table; KgCoOp (and DePT + KgCoOp) follows KgCoOp's trainer,
which differs from CoOp's on DTD only; DPL's vision side (fastprompt's own) follows CoOp's.
"""
import pytest

from fastprompt.methods import METHOD_NAMES, method_defaults
from fastprompt.methods.templates import METHOD_TEMPLATES, template_for

COOP = {
    "imagenet": "a photo of a {}.", "caltech101": "a photo of a {}.", "oxford_pets": "a photo of a {}, a type of pet.",
    "stanford_cars": "a photo of a {}.", "oxford_flowers": "a photo of a {}, a type of flower.",
    "food101": "a photo of {}, a type of food.", "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "sun397": "a photo of a {}.", "dtd": "{} texture.", "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a photo of a person doing {}.", "imagenet_v2": "a photo of a {}.", "imagenet_sketch": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.", "imagenet_r": "a photo of a {}.",
}
KGCOOP = {**COOP, "dtd": "a photo of a {}, a type of texture."}
EXPECTED = {"zsclip": COOP, "kgcoop": KGCOOP, "dpl": COOP}


@pytest.mark.parametrize("method", sorted(EXPECTED))
@pytest.mark.parametrize("dept", [False, True])
def test_every_dataset_template_per_method(method, dept):
    name = f"dept+{method}" if dept else method
    for dataset, template in EXPECTED[method].items():
        assert template_for(name, dataset) == template, (name, dataset)
    assert template_for(name, "imagefolder") == "a photo of a {}."


def test_the_table_covers_exactly_the_methods_with_a_template_option():
    with_template = {m for m in METHOD_NAMES if "+" not in m and "template" in method_defaults(m)}
    assert with_template == set(METHOD_TEMPLATES) == set(EXPECTED)


def test_a_method_without_a_template_is_refused():
    with pytest.raises(ValueError, match="method 'coop' has no hand-written template"):
        template_for("coop", "dtd")
