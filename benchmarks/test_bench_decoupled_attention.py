"""pytest-benchmark suite for the fused decoupled attention and its peers (see decoupled_attention_table.py).

    pytest benchmarks/test_bench_decoupled_attention.py --benchmark-enable   # on a GPU: CLIP shapes, bf16
Without a GPU it runs the smoke shapes in float32 through the Triton interpreter (CI: with the
project's default --benchmark-disable each case runs once, as a test that the suite works).
"""
from __future__ import annotations

import pytest
import torch

import decoupled_attention_table as table
from table_common import synced

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
SHAPES = table.GPU_SHAPES if CUDA else table.SMOKE_SHAPES
IMPL_NAMES = (("triton", "triton_qkv_bf", "triton_qkv_sf", "eager", "flex", "sdpa", "xformers") if CUDA
              else ("triton", "triton_qkv_bf", "triton_qkv_sf", "eager"))


@pytest.mark.parametrize("mode", table.MODES)
@pytest.mark.parametrize("impl", IMPL_NAMES)
@pytest.mark.parametrize("rules", table.RULES)
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0].replace(" ", "_") for s in SHAPES])
def test_decoupled_attention(benchmark, shape, rules, impl, mode):
    if impl in ("sdpa", "xformers") and rules != table.RULES[0]:
        pytest.skip("standard attention: timed once per shape, with the exact rules")
    impls, skipped = table.implementations(shape, rules, DEVICE, smoke=not CUDA)
    if impl not in impls:
        pytest.skip(skipped.get(impl, "not available"))
    layout, fn = impls[impl] if isinstance(impls[impl], tuple) else ("bhnd", impls[impl])
    sets = [table.make_inputs(shape, DTYPE, DEVICE, seed=i, layout=layout) for i in range(table.ROTATE)]
    rot = table.Rotation(sets)
    leaves = [t for qkv, _ in sets for t in qkv]

    def clear():
        for t in leaves:
            t.grad = None

    if mode == "forward":
        step = lambda: fn(*rot.next()[0])  # noqa: E731
    elif mode == "both":
        def step():
            clear()
            qkv, dout = rot.next()
            fn(*qkv).backward(dout)
    else:
        graphs = table.Rotation([(fn(*qkv), dout) for qkv, dout in sets])

        def step():
            clear()
            out, dout = graphs.next()
            out.backward(dout, retain_graph=True)

    benchmark.group = f"decoupled_attention {shape[0]} {rules} {mode}"
    benchmark.extra_info.update(impl=impl, shape=shape[0], rules=rules, mode=mode, device=str(DEVICE),
                                dtype=str(DTYPE))
    result = benchmark(synced(step))
    if mode == "forward":
        assert torch.isfinite(result).all()
    else:
        # The timed calls really computed finite gradients.
        grads = [t.grad for t in leaves if t.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
