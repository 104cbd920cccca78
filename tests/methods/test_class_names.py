"""Class lists that would silently give two classes one prompt are refused, naming them."""
import pytest

from fastprompt.clip import TINY_MODEL, load_clip
from fastprompt.methods import build_model


@pytest.fixture(scope="module")
def clip():
    return load_clip(TINY_MODEL)


LONG = "a very " * 40 + "long name"  # ~82 tokens: beyond CLIP's 77-token context


@pytest.mark.parametrize("method", ["zsclip", "coop", "maple", "dept+kgcoop", "dpl"])
def test_class_names_beyond_the_text_context_are_refused(clip, method):
    names = ["cat", LONG + " one", LONG + " two"]
    options = {"depth": 2} if method in ("maple", "dpl") else {}  # the tiny model has 3 layers
    with pytest.raises(ValueError) as err:
        build_model(method, clip, names, **options)
    message = str(err.value)
    assert "do not fit the text encoder's context of 77 tokens" in message and repr(LONG + " one") in message


def test_the_longest_name_that_fits_is_accepted(clip):
    # "X"*16 context + name + "." + start/end tokens: 77 tokens exactly.
    fits = " ".join(["dog"] * 58)
    model = build_model("coop", clip, ["cat", fits])
    assert model.text_prompts.class_tokens.token_ids.shape[1] == 77
    with pytest.raises(ValueError, match="do not fit"):
        build_model("coop", clip, ["cat", fits + " dog"])


@pytest.mark.parametrize("names,shown", [
    (["hot dog", "pizza", "hot_dog"], "'hot dog' (position 0) and 'hot_dog' (position 2)"),
    (["cat", "dog", " cat "], "'cat' (position 0) and ' cat ' (position 2)"),
])
def test_the_same_name_twice_is_refused(clip, names, shown):
    with pytest.raises(ValueError, match="are the same class name") as err:
        build_model("coop", clip, names)
    assert shown in str(err.value)
    model = build_model("maple", clip, ["a", "b"], depth=2)
    with pytest.raises(ValueError, match="are the same class name"):
        model.set_classnames(names)


def test_names_the_tokenizer_makes_identical_are_refused(clip):
    with pytest.raises(ValueError, match="classes 'cat' and 'Cat' get identical prompt tokens"):
        build_model("zsclip", clip, ["cat", "Cat"])


@pytest.mark.parametrize("method", ["coop", "dept+coop"])
def test_labels_outside_the_classes_are_the_same_clear_error(clip, method):
    import torch

    model = build_model(method, clip, ["cat", "dog", "eel"])
    images = torch.randn(2, 3, clip.image_size, clip.image_size)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\) for C=3 classes; got min 0, max 3"):
        model(images, torch.tensor([0, 3]))
