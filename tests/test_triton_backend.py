"""attention_backend="triton" (the fused decoupled-attention kernel in every prompted layer)
matches the reference path: features and gradients of the trainable prompts."""
import pytest
import torch

from fastprompt import build_model, load_clip
from fastprompt.clip import TINY_MODEL

CLASSES = ["zero", "one", "two"]


@pytest.fixture(scope="module")
def clip():
    return load_clip(TINY_MODEL)


@pytest.mark.parametrize(
    "method,options",
    [
        ("dpl", {"modality": "text"}),  # causal text, language-conditioned prompt rows, fixed mix
        ("dpl", {"modality": "vision", "instance_mix": "learned"}),  # prompts after CLS, d theta
        ("dept+maple", {}),  # exact mixing, prompts appended to the patches
    ],
)
def test_triton_backend_matches_reference(clip, method, options):
    images = torch.randn(2, 3, 32, 32)
    labels = torch.tensor([0, 2])
    results = []
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        model = build_model(method, clip, CLASSES, attention_backend=backend, depth=2, **options)
        out = model(images, labels)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.logits.detach(), out.loss.detach(), grads))
    (ref_logits, ref_loss, ref_grads), (tri_logits, tri_loss, tri_grads) = results
    torch.testing.assert_close(tri_logits, ref_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tri_loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert ref_grads.keys() == tri_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(tri_grads[name], ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)
