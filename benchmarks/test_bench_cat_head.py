"""pytest-benchmark suite for the fused CAT head loss and its peers (see cat_head_table.py).

    pytest benchmarks/test_bench_cat_head.py --benchmark-enable      # on a GPU: the full grid
Without a GPU it runs the smoke shapes through the Triton interpreter (CI: with the project's
default --benchmark-disable each case runs once, as a test that the suite works).
"""
from __future__ import annotations

import pytest
import torch

import cat_head_table as table
from table_common import synced

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if CUDA:
    SHAPES, DIM = [(b, c) for b in table.GPU_BATCHES for c in table.GPU_CLASSES], table.GPU_DIM
else:
    SHAPES, DIM = table.SMOKE_SHAPES, table.SMOKE_DIM
IMPLS, SKIPPED = table.implementations(DEVICE, smoke=not CUDA)


@pytest.mark.parametrize("mode", table.MODES)
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("b,c", SHAPES)
def test_cat_head_loss(benchmark, b, c, impl, mode):
    fn = IMPLS[impl]
    sets = [table.make_inputs(b, c, DIM, dtype=torch.bfloat16, device=DEVICE, seed=1000 * b + c + i)
            for i in range(table.ROTATE)]
    rot = table.Rotation(sets)
    grads = [t for x in sets for t in table.leaves(x)]

    def clear():
        for t in grads:
            t.grad = None

    if mode == "forward":
        step = lambda: table._call(fn, rot.next())  # noqa: E731
    elif mode == "both":
        step = lambda: (clear(), table._call(fn, rot.next()).backward())  # noqa: E731
    else:
        losses = table.Rotation([table._call(fn, x) for x in sets])
        step = lambda: (clear(), losses.next().backward(retain_graph=True))  # noqa: E731
    benchmark.group = f"cat_head B={b} C={c} d={DIM} {mode}"
    benchmark.extra_info.update(impl=impl, B=b, C=c, d=DIM, mode=mode, device=str(DEVICE))
    benchmark(synced(step))
    if mode != "forward":
        # The timed calls really computed gradients.
        assert sets[0]["weight"].grad is not None or sets[-1]["weight"].grad is not None
        assert all(torch.isfinite(t.grad).all() for t in grads if t.grad is not None)
