"""`auto` backends (fastprompt.backends): what each call runs on each device, what the log says,
and that no decoupled layer falls back to the eager op unless `reference` is asked for."""
import pytest
import torch

import fastprompt.backends as backends
from fastprompt.backends import attention_backend_for, describe_backends, head_backend_for, triton_unavailable
from fastprompt.clip import TINY_MODEL, load_clip
from fastprompt.methods import build_model, method_defaults
from fastprompt.kernels import reference as ref_ops

NAMES = ["apple", "bicycle", "cloud", "dolphin"]


def test_auto_is_every_methods_default():
    for method in ("coop", "dpl", "maple", "promptsrc", "dept+coop", "dept+dpl"):
        defaults = method_defaults(method)
        assert defaults["attention_backend"] == "auto", method
        if method.startswith("dept+"):
            assert defaults["head_backend"] == "auto", method


def test_auto_on_a_cpu_runs_sdpa_and_the_plain_head_and_explicit_choices_win():
    x = torch.zeros(2, 5, 3 * 64)
    assert attention_backend_for("auto", x, 64) == "sdpa" and head_backend_for("auto", x) == "reference"
    for explicit in ("reference", "sdpa", "triton"):
        assert attention_backend_for(explicit, x, 64) == explicit
    assert head_backend_for("triton", x) == "triton"
    assert triton_unavailable(torch.device("cpu")) == "cpu device: the Triton kernels run natively on CUDA GPUs only"


def test_auto_on_a_gpu_names_it_and_older_gpus_are_refused_by_arch(monkeypatch):
    gpu = torch.device("cuda", 0)
    monkeypatch.setitem(backends._TRITON_ON, gpu, None)  # as on a GPU where Triton runs
    monkeypatch.setattr(backends, "_device_name", lambda device: "NVIDIA H200, sm_90, Triton 3.8.0")
    assert describe_backends("auto", "auto", gpu) == (
        "attention: auto -> triton (NVIDIA H200, sm_90, Triton 3.8.0); CAT head: auto -> triton (NVIDIA H200, sm_90, "
        "Triton 3.8.0)")
    assert describe_backends("sdpa", None, gpu) == "attention: sdpa (asked for)"
    monkeypatch.setattr(backends, "device_arch", lambda device: 75)
    assert backends._why_not_triton(gpu) == "sm_75 GPU: the kernels' tiles are sized for sm_80 and newer"


def test_describe_on_a_cpu_says_why_not_triton():
    assert describe_backends("auto", "auto", torch.device("cpu")) == (
        "attention: auto -> sdpa (cpu device: the Triton kernels run natively on CUDA GPUs only); "
        "CAT head: auto -> reference (cpu device: the Triton kernels run natively on CUDA GPUs only)")


@pytest.mark.parametrize("method", ["dpl", "dept+dpl"])
def test_decoupled_layers_under_auto_never_run_the_eager_op(method, monkeypatch):
    """DPL's default rules under `auto` on a CPU: the SDPA-segment path, equal to the eager spec
    (`reference`) in value and gradient; the eager op runs only when asked for."""
    import fastprompt.encoders as encoders

    torch.manual_seed(0)
    clip = load_clip(TINY_MODEL, None)
    images, labels = torch.randn(3, 3, clip.image_size, clip.image_size), torch.tensor([0, 3, 1])
    results = {}
    for backend in ("auto", "reference"):
        torch.manual_seed(1)
        model = build_model(method, clip, NAMES, attention_backend=backend, depth=3)
        calls = {"eager": 0, "segments": 0}
        eager, segments = ref_ops.decoupled_attention, encoders.decoupled_attention_sdpa

        def count(name, fn):
            def counted(*args, **kwargs):
                calls[name] += 1
                return fn(*args, **kwargs)
            return counted

        monkeypatch.setattr(encoders.ref_ops, "decoupled_attention", count("eager", eager))
        monkeypatch.setattr(encoders, "decoupled_attention_sdpa", count("segments", segments))
        out = model(images, labels)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        monkeypatch.undo()
        results[backend] = (out.loss.detach(), grads, calls)
    (loss_auto, grads_auto, calls_auto), (loss_ref, grads_ref, calls_ref) = results["auto"], results["reference"]
    assert calls_auto["eager"] == 0 and calls_auto["segments"] > 0
    assert calls_ref["segments"] == 0 and calls_ref["eager"] > 0
    torch.testing.assert_close(loss_auto, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads_auto.keys() == grads_ref.keys() and grads_auto
    for name in grads_auto:
        torch.testing.assert_close(grads_auto[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)
