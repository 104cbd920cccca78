"""fastprompt.kernels: fused ops for prompt tuning, with their plain-PyTorch reference twins.

`reference` holds the spec (materialises everything, any device). Imports nothing of fastprompt.
"""
from . import reference
# The fused Triton decoupled attention and its drop-in module (the spec stays at .reference).
from .decoupled_attention import decoupled_attention
from .attention_module import DecoupledAttention, swap_attention
# The fused Triton CAT head (the reference twin stays at fastprompt.kernels.reference).
from .cat_head import cat_head_logits, cat_head_loss

__all__ = ["reference", "decoupled_attention", "DecoupledAttention", "swap_attention", "cat_head_loss", "cat_head_logits"]
