"""fastprompt.kernels: fused ops for prompt tuning, with their plain-PyTorch reference twins.

`reference` holds the spec (materialises everything, any device). Imports nothing of fastprompt.
"""
from . import reference
from .reference import decoupled_attention
# The fused Triton CAT head (the reference twin stays at fastprompt.kernels.reference).
from .cat_head import cat_head_logits, cat_head_loss

__all__ = ["reference", "decoupled_attention", "cat_head_loss", "cat_head_logits"]
