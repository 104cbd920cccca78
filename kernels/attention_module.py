"""Drop-in decoupled attention for models built on `nn.MultiheadAttention`, batch- or sequence-first.

`swap_attention(model, prompt_start=..., num_prompts=..., ...)` replaces every
`nn.MultiheadAttention` in a module tree (OpenAI CLIP's sequence-first ResidualAttentionBlocks as
vendored by CoOp, MaPLe, DePT, ...; open_clip's batch-first ones; any other blocks) by a
`DecoupledAttention` that shares the original's projection Parameters (no copy: training the
prompts, or the projections, updates one set of weights) and runs the fused kernel on the packed
projection in the caller's own layout (no transposes, no copies). With exact/exact rules the
model computes what it computed before, at any prompt range.
"""
from __future__ import annotations

import importlib.util
from typing import List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .decoupled_attention_sdpa import decoupled_attention_sdpa
from .reference import decoupled_attention as reference_decoupled_attention

__all__ = ["DecoupledAttention", "swap_attention", "mask_is_causal"]


def mask_is_causal(attn_mask: torch.Tensor, n: int) -> bool:
    """Is `attn_mask` ([N, N], additive float or boolean "True = masked") exactly the causal mask?

    Additive: 0 on and below the diagonal, -inf above (OpenAI CLIP's and open_clip's text tower;
    any float dtype). Boolean: True exactly above the diagonal (nn.MultiheadAttention's
    convention). Checked on the mask's own device (one host sync on a GPU).
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
    """Self-attention with DPL's decoupled attention, over an `nn.MultiheadAttention`'s weights.

    Call it like the module it replaces, in its layout: batch-first [B, N, E] or sequence-first
    [N, B, E] (`batch_first` is copied from the replaced module), e.g. OpenAI CLIP's
    `attn(x, x, x, need_weights=False, attn_mask=self.attn_mask)`; returns (out, None) (no
    attention weights, whatever `need_weights` says). `attn_mask` may be None or the causal mask
    (additive -inf above the diagonal in any float dtype, or boolean True above it, on any device);
    `key_padding_mask` must be None. Anything else raises a ValueError naming the layer. A mask
    tensor is checked once (a host sync on a GPU) and then trusted while it is that same object,
    unmodified; `causal=True/False` skips the check altogether (and keeps
    `torch.compile(fullgraph=True)` free of data-dependent branches).

    The prompt range, rules and `prompt_rows_see_all` are attributes: a prompt method may change
    them between calls. For `learned` rules the module owns theta [H] Parameters
    (`instance_theta` / `prompt_theta`, initialised from `*_weight` or zeros, i.e. w = 0.5).
    `backend="sdpa"` computes the same layer from fused SDPA calls per key segment (any device, no
    Triton, no score matrix: the fast path where Triton cannot run); `backend="reference"` runs the
    plain-PyTorch spec (any device; materialises the scores: for checking).
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
        name: str = "",
    ):
        super().__init__()
        self.layer_name = name or "DecoupledAttention"
        _check_swappable(mha, self.layer_name)
        if backend not in ("triton", "sdpa", "reference"):
            raise ValueError(f"backend must be 'triton', 'sdpa' or 'reference', got {backend!r}")
        if backend == "triton" and importlib.util.find_spec("triton") is None:
            raise ValueError(f"{self.layer_name}: backend='triton' needs Triton, which is not installed on this "
                             "platform; use backend='sdpa' (fused SDPA calls, any device) or keep nn.MultiheadAttention")
        self.embed_dim = mha.embed_dim
        self.num_heads = mha.num_heads
        self.head_dim = mha.embed_dim // mha.num_heads
        self.batch_first = mha.batch_first
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
            raise ValueError(f"{self.layer_name}: a learned rule's weight must be a tensor theta of shape "
                             f"[{self.num_heads}], got {weight!r}")
        return nn.Parameter(weight.detach().clone().to(device))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}, "
                f"prompts=[{self.prompt_start}, {self.prompt_start + self.num_prompts}), "
                f"instance_mix={self.instance_mix}, prompt_mix={self.prompt_mix}, "
                f"prompt_rows_see_all={self.prompt_rows_see_all}, backend={self.backend}")

    def remember_causal_mask(self, attn_mask: torch.Tensor) -> None:
        """Trust `attn_mask` as the causal mask (already checked) while it is unmodified."""
        self._causal_mask_seen = (attn_mask, attn_mask._version)

    def _is_causal(self, attn_mask: Optional[torch.Tensor], is_causal: bool, n: int) -> bool:
        if self.causal is not None:
            return self.causal
        if attn_mask is None:
            return bool(is_causal)
        # OpenAI CLIP and open_clip pass the same mask tensor on every call: check its values once (a
        # host sync on GPU), then trust that very object while it is unmodified (version unchanged).
        seen = self._causal_mask_seen
        if seen is not None and seen[0] is attn_mask and seen[1] == attn_mask._version:
            return True
        if mask_is_causal(attn_mask, n):
            self.remember_causal_mask(attn_mask)
            return True
        raise ValueError(
            f"{self.layer_name}: attn_mask must be None or the causal mask (-inf, or True, above the diagonal); "
            f"got a different {tuple(attn_mask.shape)} {attn_mask.dtype} mask, which the decoupled-attention "
            "kernel cannot compute. Keep nn.MultiheadAttention for this layer (leave it out of swap_attention)."
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
        """query = key = value: [B, N, E] (batch_first) or [N, B, E]. Returns (out in that layout, None)."""
        if not (query is key and key is value):
            raise ValueError(f"{self.layer_name}: query, key and value must be the same tensor "
                             "(DecoupledAttention computes self-attention only)")
        if key_padding_mask is not None:
            raise ValueError(f"{self.layer_name}: key_padding_mask is not supported by DecoupledAttention (the "
                             "kernel has no padding mask); keep nn.MultiheadAttention for this layer")
        if query.dim() != 3:
            layout = "[B, N, E]" if self.batch_first else "[N, B, E]"
            raise ValueError(f"{self.layer_name}: query must be a batched {layout} tensor, got shape "
                             f"{tuple(query.shape)}")
        n = query.shape[1] if self.batch_first else query.shape[0]
        causal = self._is_causal(attn_mask, is_causal, n)
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
        rules = dict(
            prompt_start=self.prompt_start, num_prompts=self.num_prompts, causal=causal,
            prompt_rows_see_all=self.prompt_rows_see_all, instance_mix=self.instance_mix, prompt_mix=self.prompt_mix,
            instance_weight=self.instance_theta if self.instance_mix == "learned" else self.instance_weight,
            prompt_weight=self.prompt_theta if self.prompt_mix == "learned" else self.prompt_weight,
        )
        if self.backend == "triton":
            # Imported here: backend="reference" works where Triton is not installed.
            from .decoupled_attention import decoupled_attention_qkv

            out = decoupled_attention_qkv(qkv, num_heads=self.num_heads, seq_first=not self.batch_first, **rules)
        else:
            out = self._unfused(qkv, rules)
        return self.out_proj(out), None

    def _unfused(self, qkv: torch.Tensor, rules: dict) -> torch.Tensor:
        """The `sdpa` or `reference` op on [B, H, N, D] views of the packed projection."""
        parts = qkv.unflatten(-1, (3, self.num_heads, self.head_dim))
        order = (2, 0, 3, 1, 4) if self.batch_first else (2, 1, 3, 0, 4)
        q, k, v = parts.permute(order).unbind(0)
        op = decoupled_attention_sdpa if self.backend == "sdpa" else reference_decoupled_attention
        o = op(q, k, v, **rules)  # [B, H, N, D]
        o = o.transpose(1, 2) if self.batch_first else o.permute(2, 0, 1, 3)
        return o.flatten(2)


def _check_swappable(mha: nn.MultiheadAttention, name: str) -> None:
    problems = []
    if not mha._qkv_same_embed_dim:
        problems.append("separate kdim/vdim projections")
    if mha.bias_k is not None or mha.add_zero_attn:
        problems.append("add_bias_kv / add_zero_attn")
    if mha.dropout > 0:
        problems.append(f"attention dropout {mha.dropout} (the kernel has no dropout; set it to 0 or keep this layer)")
    if problems:
        raise ValueError(f"{name}: cannot replace this nn.MultiheadAttention: {', '.join(problems)} not supported")


def _owner_mask(model: nn.Module, parent_name: str) -> Optional[torch.Tensor]:
    """The additive mask the block holding the attention passes it (OpenAI CLIP's
    `ResidualAttentionBlock.attn_mask`), if the block keeps one as an attribute."""
    parent = model.get_submodule(parent_name) if parent_name else model
    mask = getattr(parent, "attn_mask", None)
    return mask if isinstance(mask, torch.Tensor) else None


def swap_attention(
    model: nn.Module,
    *,
    prompt_start: int = 0,
    num_prompts: int = 0,
    **options,
) -> List[str]:
    """Replace every `nn.MultiheadAttention` in `model` (in place) by `DecoupledAttention`.

    Batch-first and sequence-first modules alike (the replacement keeps the layout). `options` are
    DecoupledAttention's keyword arguments (prompt_rows_see_all, instance_mix, prompt_mix,
    instance_weight, prompt_weight, causal, backend); each replaced layer gets its own theta
    Parameters for `learned` rules. Decided here, before anything is replaced: a module with
    features the kernel lacks (separate kdim/vdim, bias_kv, dropout) and a block that keeps an
    `attn_mask` tensor other than None or the causal mask (a padding or arbitrary mask) raise a
    ValueError naming the layer; a block's causal mask is checked now and trusted at call time.
    Returns the qualified names of the replaced modules.
    """
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.MultiheadAttention)]
    if not targets:
        raise ValueError("model holds no nn.MultiheadAttention to replace")
    if targets[0][0] == "":
        raise ValueError("model is itself an nn.MultiheadAttention: wrap it with DecoupledAttention(mha) instead")
    plans = []
    for name, mha in targets:
        parent_name, _, child = name.rpartition(".")
        _check_swappable(mha, name)
        mask = _owner_mask(model, parent_name)
        if mask is not None and (mask.dim() != 2 or not mask_is_causal(mask, mask.shape[0])):
            raise ValueError(
                f"{name}: its block holds an attn_mask {tuple(mask.shape)} that is not the causal mask; the "
                "decoupled-attention kernel computes no mask or the causal one. Leave this layer out of "
                "swap_attention (swap a sub-module instead)."
            )
        plans.append((name, parent_name, child, mha, mask))
    replaced = []
    for name, parent_name, child, mha, mask in plans:
        parent = model.get_submodule(parent_name) if parent_name else model
        swapped = DecoupledAttention(mha, prompt_start=prompt_start, num_prompts=num_prompts, name=name, **options)
        if mask is not None:
            swapped.remember_causal_mask(mask)
        setattr(parent, child, swapped)
        replaced.append(name)
    return replaced
