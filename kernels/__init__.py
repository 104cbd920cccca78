"""fastprompt.kernels: fused ops for prompt tuning, with their plain-PyTorch reference twins.

`reference` holds the spec (materialises everything, any device). Imports nothing of fastprompt.
"""
from . import reference

from .attention_module import DecoupledAttention, swap_attention  # backend="reference" needs no Triton

try:
    # The fused Triton ops (their reference twins stay at .reference).
    from .decoupled_attention import decoupled_attention, decoupled_attention_qkv
    from .cat_head import cat_head_logits, cat_head_loss
except ModuleNotFoundError as err:
    if err.name != "triton":
        raise
    # No Triton on this platform (macOS, Windows): the reference and SDPA paths still work, and
    # the fused ops say what to use instead.
    _NO_TRITON = (
        "fastprompt.kernels.{0} needs Triton, which is not installed on this platform; use "
        "fastprompt.kernels.reference.{0} (attention_backend='sdpa' or 'reference', head_backend='reference')"
    )

    def _needs_triton(name):
        def op(*args, **kwargs):
            raise RuntimeError(_NO_TRITON.format(name))

        op.__name__ = name
        return op

    decoupled_attention = _needs_triton("decoupled_attention")
    decoupled_attention_qkv = _needs_triton("decoupled_attention_qkv")
    cat_head_loss = _needs_triton("cat_head_loss")
    cat_head_logits = _needs_triton("cat_head_logits")

__all__ = ["reference", "decoupled_attention", "decoupled_attention_qkv", "DecoupledAttention", "swap_attention", "cat_head_loss", "cat_head_logits"]
