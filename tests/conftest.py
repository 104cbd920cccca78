"""Test-wide setup.

Triton must learn whether to interpret *before* it is imported: with no CUDA device we switch the
interpreter on, so every kernel test runs on the CPU in CI and natively on a GPU.
"""
import os
import shutil

if shutil.which("nvidia-smi") is None and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    # The test models are tiny: with two test workers sharing 2 cores, a second intra-op thread
    # only spins. One thread per worker keeps the suite fast and its timings stable.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed_everything():
    # Fresh but reproducible random inputs in every test.
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


class OpCounts:
    """What a piece of code asks of the device, read on the CPU (TorchDispatchMode + the interpreter).

    `ops`: every aten op by name (also those inside fastprompt's custom ops, which run with the mode
    re-entered; the Triton interpreter's own host copies of a launch's arguments are not counted:
    they emulate a launch, the GPU makes none). `launches`: Triton kernel names, in launch order.
    Use as a context manager: `with OpCounts() as counts: ...`.
    """

    COPIES = ("copy_", "clone", "_to_copy", "contiguous", "stack", "cat", "_reshape_copy")
    # Ops that read device data on the host (a blocking sync on a GPU) or make shapes data-dependent.
    SYNCS = ("_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "unique", "_unique2", "item")

    def __init__(self):
        import collections

        self.ops = collections.Counter()
        self.launches = []

    def copies(self):
        return {k: v for k, v in self.ops.items() if k in self.COPIES}

    def syncs(self):
        return {k: v for k, v in self.ops.items() if k in self.SYNCS}

    def __enter__(self):
        import triton.runtime.interpreter as interp
        from torch._library.custom_ops import OPDEFS
        from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

        counts = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                packet = func.overloadpacket
                ns = getattr(packet, "_qualified_op_name", str(packet)).split("::")[0]
                counts.ops[packet.__name__ if ns == "aten" else f"{ns}::{packet.__name__}"] += 1
                if ns == "fastprompt":
                    with self:  # look inside: the op's own Python body, under this mode again
                        return OPDEFS[f"fastprompt::{packet.__name__}"]._init_fn(*args, **kwargs)
                return func(*args, **kwargs)

        original = interp.GridExecutor.__call__

        def launch(executor, *args, **kwargs):
            counts.launches.append(executor.fn.__name__)
            with _disable_current_modes():
                return original(executor, *args, **kwargs)

        self._restore = lambda: setattr(interp.GridExecutor, "__call__", original)
        interp.GridExecutor.__call__ = launch
        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        self._restore()
        return False


@pytest.fixture
def op_counts():
    """A fresh OpCounts (see its docstring); requires the Triton interpreter."""
    from fastprompt.kernels.validation import triton_interpreter_enabled

    if not triton_interpreter_enabled():
        pytest.skip("counts ops under the Triton interpreter (CPU)")
    return OpCounts()
