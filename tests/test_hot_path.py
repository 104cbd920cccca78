"""A training step on the fused paths asks nothing of the host: no `.item()`, no `bool(tensor)`,
no data-dependent shapes (each a blocking device-to-host sync on a GPU), and DePT computes no
logits it does not use. Counted under the Triton interpreter with a dispatch mode (tests/conftest.py
OpCounts); the model is the tiny random-init CLIP.
"""
import pytest
import torch

from fastprompt import build_model, load_clip
from fastprompt.clip import TINY_MODEL

CLASSES = ["zero", "one", "two"]


@pytest.fixture(scope="module")
def clip():
    return load_clip(TINY_MODEL)


@pytest.mark.parametrize("method,options", [
    ("dept+maple", {"depth": 2}),
    ("dept+dpl", {"depth": 2}),  # decoupled attention in both towers (language-conditioned text) + CAT head
    ("dpl", {"depth": 2, "modality": "vision", "instance_mix": "learned"}),
    ("dept+promptsrc", {"depth": 2, "vis_depth": 2}),  # IVLP's deep prompts, PromptSRC's frozen-branch terms
])
def test_training_step_has_no_host_sync(clip, op_counts, method, options):
    head = {"head_backend": "triton"} if method.startswith("dept") else {}
    model = build_model(method, clip, CLASSES, attention_backend="triton", **head, **options)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    model.train()
    step = lambda: (optimizer.zero_grad(), model(images, labels).loss.backward(), optimizer.step())  # noqa: E731
    step()  # first step: caches (class prompts, masks) fill
    with op_counts as counts:
        step()
    assert counts.syncs() == {}, counts.syncs()
    kernels = set(counts.launches)
    if "dpl" in method:  # decoupled rules: the fused kernels; MaPLe's exact attention dispatches to SDPA
        assert {"_forward_kernel", "_backward_dq_kernel", "_backward_dkdv_kernel"} <= kernels
    else:
        assert not kernels & {"_forward_kernel", "_backward_dq_kernel", "_backward_dkdv_kernel"}
        assert any("scaled_dot_product" in op for op in counts.ops)
    if method.startswith("dept"):
        assert "fastprompt::cat_head_loss" in counts.ops
        # The reported logits are not computed by a training step (only when read).
        assert "fastprompt::cat_head_logits" not in counts.ops and "_logits_kernel" not in kernels


def test_dept_training_output_computes_its_logits_when_read(clip):
    model = build_model("dept+coop", clip, CLASSES, head_backend="reference")
    images = torch.randn(2, 3, 32, 32)
    out = model(images, torch.tensor([0, 1]))
    assert out._logits is None
    logits = out.logits
    assert logits.shape == (2, len(CLASSES)) and not logits.requires_grad
    assert out.logits is logits  # computed once
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits, model(images).logits)  # the inference logits, as before
