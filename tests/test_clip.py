"""load_clip: frozen, eval, dtype; weights from a local file; clear errors naming file and model."""
import pytest
import torch
from safetensors.torch import save_file

from fastprompt.clip import TINY_MODEL, load_clip


def test_frozen_eval_and_dtype():
    clip = load_clip(TINY_MODEL, dtype="bf16")
    assert not clip.model.training
    assert all(not p.requires_grad for p in clip.model.parameters())
    assert {p.dtype for p in clip.model.parameters()} == {torch.bfloat16}
    assert clip.image_size == 32 and clip.embed_dim == 64 and clip.logit_scale == pytest.approx(1 / 0.07, rel=1e-3)


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(3)
    expected = torch.rand(2)
    torch.manual_seed(3)
    a, b = load_clip(TINY_MODEL), load_clip(TINY_MODEL)
    assert torch.equal(torch.rand(2), expected)
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters()))
    c = load_clip(TINY_MODEL, seed=1)
    assert not torch.equal(next(a.model.parameters()), next(c.model.parameters()))


def test_local_checkpoint_round_trip(tmp_path):
    source = load_clip(TINY_MODEL, seed=7)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    loaded = load_clip(TINY_MODEL, str(path))
    for (name, x), y in zip(source.model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(x, y), name


def test_mismatched_checkpoint_names_file_and_model(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in load_clip(TINY_MODEL).model.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match=f"checkpoint '{path}' does not fit open_clip model 'ViT-B-32'"):
        load_clip("ViT-B-32", str(path))


def test_missing_checkpoint_names_file_and_model(tmp_path):
    missing = str(tmp_path / "nowhere" / "ViT-B-16.pt")
    with pytest.raises(FileNotFoundError, match=f"checkpoint file '{missing}' for model 'ViT-B-16' does not exist"):
        load_clip("ViT-B-16", missing)


def test_unknown_model_and_tag():
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-B-61'. Did you mean"):
        load_clip("ViT-B-61")
    with pytest.raises(ValueError, match="'opnai' is neither a file nor a pretrained tag of 'ViT-B-16'; its tags are: .*openai"):
        load_clip("ViT-B-16", "opnai")
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        load_clip(TINY_MODEL, dtype="fp8")
