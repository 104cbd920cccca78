"""DePT trained with the fused Triton CAT head follows the reference head's loss curve."""
import pytest
import torch

from fastprompt import build_model, load_clip
from fastprompt.clip import TINY_MODEL

CLASSES = ["zero", "one", "two", "three", "four", "five", "six"]


def _train(backend, base, steps=6):
    torch.manual_seed(0)
    clip = load_clip(TINY_MODEL)
    options = {"depth": 2} if base == "maple" else {}
    model = build_model(f"dept+{base}", clip, CLASSES, head_backend=backend, **options)
    groups = model.parameter_groups()
    optim = torch.optim.SGD(
        [{"params": groups["prompt"], "lr": 0.01}, {"params": groups["head"], "lr": 0.065}], momentum=0.9
    )
    data = torch.Generator().manual_seed(1)
    losses = []
    model.train()
    for _ in range(steps):
        images = torch.randn(5, 3, 32, 32, generator=data)
        labels = torch.randint(0, len(CLASSES), (5,), generator=data)
        out = model(images, labels)
        optim.zero_grad()
        out.loss.backward()
        optim.step()
        losses.append(out.loss.item())
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(3, 3, 32, 32, generator=data)).logits
    return losses, logits


@pytest.mark.parametrize("base", ["coop", "cocoop"])
def test_triton_head_matches_reference_training(base):
    ref_losses, ref_logits = _train("reference", base)
    tri_losses, tri_logits = _train("triton", base)
    assert ref_losses[-1] < ref_losses[0]  # it learns
    torch.testing.assert_close(torch.tensor(tri_losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tri_logits, ref_logits, rtol=1e-4, atol=1e-4)
