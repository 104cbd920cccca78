"""Weights shipped in the package: the sparse fp16 format round-trips, and load_clip finds them offline."""
import pytest
import torch

from fastprompt.clip import load_clip
from fastprompt.shipped_weights import (SHIPPED, load_packed, pack_state_dict, save_packed, shipped_checkpoint,
                                        unpack_state_dict)


def test_pack_unpack_round_trip_is_fp16_exact_with_zero_rows(tmp_path):
    model = load_clip("fastprompt-world").model  # random init
    state = model.state_dict()
    keep = torch.tensor([0, 5, 49407, 320])
    path = tmp_path / "w.safetensors"
    save_packed(path, pack_state_dict(state, keep), {"note": "test"})
    packed, meta = load_packed(path)
    assert meta == {"note": "test"}
    full = unpack_state_dict(packed, state)
    for key, value in state.items():
        if key == "token_embedding.weight":
            rows = torch.zeros(value.shape[0], dtype=torch.bool)
            rows[keep] = True
            assert torch.equal(full[key][rows], value[rows].half().float()) and not full[key][~rows].any()
        else:
            assert full[key].dtype == value.dtype and torch.equal(full[key], value.half().float()), key
    assert path.stat().st_size < 4e6  # 12.6 MB of token table not stored
    with pytest.raises(ValueError, match="do not fit"):
        unpack_state_dict({k: v for k, v in packed.items() if k != "logit_scale"}, state)


def test_load_clip_loads_the_shipped_world_weights_offline():
    shipped = SHIPPED[("fastprompt-world", "world")]
    assert shipped_checkpoint("fastprompt-world", "world") is shipped and shipped_checkpoint("fastprompt-world", None) is None
    assert shipped.file.is_file() and shipped.file.stat().st_size < 5e6
    clip = load_clip("fastprompt-world", "world")
    packed, meta = load_packed(shipped.file)
    assert torch.equal(clip.model.visual.conv1.weight, packed["visual.conv1.weight"].float())
    assert meta["recipe"]["seed"] == 0 and meta["zero_shot"]["seen"] > 90
    assert not any(p.requires_grad for p in clip.model.parameters()) and clip.image_size == 32
    assert clip.embed_dim == 128 and 10 < clip.logit_scale <= 100


def test_a_wrong_tag_names_the_shipped_one():
    with pytest.raises(ValueError, match="tags are: world"):
        load_clip("fastprompt-world", "wrld")


def test_the_shipped_weights_load_into_the_activation_they_were_pretrained_with():
    # Pretraining trains the random init load_clip builds from the model name (nn.GELU); the shipped
    # weights must come back in the same towers, whatever the name's config would say later.
    pretrained_in = load_clip("fastprompt-world", None).activation
    clip = load_clip("fastprompt-world", "world")
    assert clip.activation == pretrained_in == "gelu"
    assert not SHIPPED[("fastprompt-world", "world")].quick_gelu
    assert "nn.GELU" in clip.build_note and "shipped with fastprompt were pretrained with GELU" in clip.build_note
