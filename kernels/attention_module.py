"""Drop-in decoupled attention for models built on batch-first `nn.MultiheadAttention`.

`swap_attention(model, prompt_start=..., num_prompts=..., ...)` replaces every batch-first
`nn.MultiheadAttention` in a module tree (open_clip's ResidualAttentionBlock, or any other
prompt-learning codebase's blocks) by a `DecoupledAttention` that shares the original's
projection Parameters (no copy: training the prompts, or the projections, updates one set of
weights) and runs the fused kernel. With exact/exact rules the model computes what it computed
before, at any prompt range.
"""
from __future__ import annotations

from typing import List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .reference import decoupled_attention as reference_decoupled_attention

__all__ = ["DecoupledAttention", "swap_attention", "mask_is_causal"]


def mask_is_causal(attn_mask: torch.Tensor, n: int) -> bool:
    """Is `attn_mask` ([N, N], additive float or boolean "True = masked") exactly the causal mask?

    Additive: 0 on and below the diagonal, -inf above (open_clip's text tower). Boolean: True
    exactly above the diagonal (nn.MultiheadAttention's convention).
    """
    if attn_mask.shape != (n, n):
        return False
    above = torch.ones(n, n, dtype=torch.bool, device=attn_mask.device).triu(1)
    if attn_mask.dtype == torch.bool:
        return bool(torch.equal(attn_mask, above))
    upper_is_neg_inf = torch.isneginf(attn_mask[above]).all()
    rest_is_zero = (attn_mask[~above] == 0).all()
    return bool(upper_is_neg_inf and rest_is_zero)


class DecoupledAttention(nn.Module):
    """Batch-first self-attention with DPL's decoupled attention, over an `nn.MultiheadAttention`'s weights.

    Call it like the module it replaces: `attn(x, x, x, need_weights=False, attn_mask=mask)`
    returns (out [B, N, E], None). `attn_mask` may be None or the causal mask (additive -inf above
    the diagonal, or boolean True above it); anything else raises. `causal=None` detects the mask
    on every call (a host sync on GPU); pass causal=True/False to skip the check (and to keep
    `torch.compile(fullgraph=True)` free of data-dependent branches).

    The prompt range, rules and `prompt_rows_see_all` are attributes: a prompt method may change
    them between calls. For `learned` rules the module owns theta [H] Parameters
    (`instance_theta` / `prompt_theta`, initialised from `*_weight` or zeros, i.e. w = 0.5).
    `backend="reference"` runs the plain-PyTorch spec instead (any device, no Triton).
    """

    def __init__(
        self,
        mha: nn.MultiheadAttention,
        *,
        prompt_start: int = 0,
        num_prompts: int = 0,
        prompt_rows_see_all: bool = False,
        instance_mix: str = "exact",
        prompt_mix: str = "exact",
        instance_weight: Union[None, float, torch.Tensor] = None,
        prompt_weight: Union[None, float, torch.Tensor] = None,
        causal: Optional[bool] = None,
        backend: str = "triton",
    ):
        super().__init__()
        _check_swappable(mha)
        if backend not in ("triton", "reference"):
            raise ValueError(f"backend must be 'triton' or 'reference', got {backend!r}")
        self.embed_dim = mha.embed_dim
        self.num_heads = mha.num_heads
        self.head_dim = mha.embed_dim // mha.num_heads
        self.batch_first = True
        # Shared, not copied: the same Parameter objects as the replaced module.
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj
        self.prompt_start = prompt_start
        self.num_prompts = num_prompts
        self.prompt_rows_see_all = prompt_rows_see_all
        self.instance_mix = instance_mix
        self.prompt_mix = prompt_mix
        self.causal = causal
        self.backend = backend
        self._causal_mask_seen = None
        device = mha.in_proj_weight.device
        self.instance_theta = self._theta(instance_mix, instance_weight, device)
        self.prompt_theta = self._theta(prompt_mix, prompt_weight, device)
        self.instance_weight = None if instance_mix == "learned" else instance_weight
        self.prompt_weight = None if prompt_mix == "learned" else prompt_weight

    def _theta(self, mix: str, weight, device) -> Optional[nn.Parameter]:
        if mix != "learned":
            return None
        if weight is None:
            return nn.Parameter(torch.zeros(self.num_heads, device=device))
        if not isinstance(weight, torch.Tensor) or weight.shape != (self.num_heads,):
            raise ValueError(f"a learned rule's weight must be a tensor theta of shape [{self.num_heads}], got {weight!r}")
        return nn.Parameter(weight.detach().clone().to(device))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, prompts=[{self.prompt_start}, "
                f"{self.prompt_start + self.num_prompts}), instance_mix={self.instance_mix}, "
                f"prompt_mix={self.prompt_mix}, prompt_rows_see_all={self.prompt_rows_see_all}, backend={self.backend}")

    def _is_causal(self, attn_mask: Optional[torch.Tensor], is_causal: bool, n: int) -> bool:
        if self.causal is not None:
            return self.causal
        if attn_mask is None:
            return bool(is_causal)
        # open_clip passes the same mask tensor on every call: check its values once (a host sync on
        # GPU), then trust that very object while it is unmodified (its version counter unchanged).
        seen = self._causal_mask_seen
        if seen is not None and seen[0] is attn_mask and seen[1] == attn_mask._version:
            return True
        if mask_is_causal(attn_mask, n):
            self._causal_mask_seen = (attn_mask, attn_mask._version)
            return True
        raise ValueError(
            "attn_mask: DecoupledAttention supports no mask or the causal mask (-inf above the diagonal); "
            f"got a different {tuple(attn_mask.shape)} mask. Keep nn.MultiheadAttention for this layer."
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[torch.Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        """query = key = value: [B, N, E] (self-attention). Returns (out [B, N, E], None)."""
        if not (query is key and key is value):
            raise ValueError("query, key and value must be the same tensor: DecoupledAttention is self-attention only")
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask is not supported by DecoupledAttention")
        if query.dim() != 3:
            raise ValueError(f"query must be batch-first [B, N, E], got shape {tuple(query.shape)}")
        b, n, e = query.shape
        causal = self._is_causal(attn_mask, is_causal, n)
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
        # [B, N, 3, H, Dh] -> three [B, H, N, Dh] views; the kernel takes the strides as they are.
        q, k, v = qkv.view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.backend == "triton":
            # Imported here: backend="reference" works where Triton is not installed. (From its module:
            # the package attribute `decoupled_attention` is the function.)
            from .decoupled_attention import decoupled_attention as op
        else:
            op = reference_decoupled_attention
        out = op(
            q, k, v, prompt_start=self.prompt_start, num_prompts=self.num_prompts, causal=causal,
            prompt_rows_see_all=self.prompt_rows_see_all, instance_mix=self.instance_mix,
            prompt_mix=self.prompt_mix,
            instance_weight=self.instance_theta if self.instance_mix == "learned" else self.instance_weight,
            prompt_weight=self.prompt_theta if self.prompt_mix == "learned" else self.prompt_weight,
        )
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, e))
        return out, None


def _check_swappable(mha: nn.MultiheadAttention) -> None:
    problems = []
    if not mha.batch_first:
        problems.append("batch_first=False")
    if not mha._qkv_same_embed_dim:
        problems.append("separate kdim/vdim projections")
    if mha.bias_k is not None or mha.add_zero_attn:
        problems.append("add_bias_kv / add_zero_attn")
    if mha.dropout > 0:
        problems.append(f"attention dropout {mha.dropout}")
    if problems:
        raise ValueError(f"cannot replace this nn.MultiheadAttention: {', '.join(problems)} not supported")


def swap_attention(
    model: nn.Module,
    *,
    prompt_start: int = 0,
    num_prompts: int = 0,
    **options,
) -> List[str]:
    """Replace every batch-first `nn.MultiheadAttention` in `model` (in place) by `DecoupledAttention`.

    `options` are DecoupledAttention's keyword arguments (prompt_rows_see_all, instance_mix,
    prompt_mix, instance_weight, prompt_weight, causal, backend); each replaced layer gets its
    own theta Parameters for `learned` rules. Modules with batch_first=False are left alone.
    Returns the qualified names of the replaced modules; raises ValueError if none was found or a
    batch-first one uses features the kernel lacks (separate kdim/vdim, bias_kv, dropout).
    """
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.MultiheadAttention) and mod.batch_first]
    if not targets:
        raise ValueError("model holds no batch-first nn.MultiheadAttention to replace")
    if targets[0][0] == "":
        raise ValueError("model is itself an nn.MultiheadAttention: wrap it with DecoupledAttention(mha) instead")
    replaced = []
    for name, mha in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        swapped = DecoupledAttention(mha, prompt_start=prompt_start, num_prompts=num_prompts, **options)
        setattr(parent, child, swapped)
        replaced.append(name)
    return replaced
