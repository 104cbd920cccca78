"""CLIP's image and text encoders re-run over open_clip's own modules, with prompt tokens.

We do not copy weights: each encoder holds references to the open_clip tower's modules and
Parameters and re-implements only the forward, so that it can
  * insert shallow prompt tokens at the position a method needs (after CLS, appended to the
    patches, or text positions 1..n_ctx) and replace them with deep prompts at later layers;
  * route each layer's attention through a chosen backend (fastprompt.backends): `auto` (the
    default: `triton` on a GPU that runs it, else `sdpa`), `reference` (plain PyTorch, the spec),
    `sdpa` (torch's fused attention; decoupled layers as fused SDPA calls per segment,
    fastprompt.kernels.decoupled_attention_sdpa), or `triton` (fastprompt's fused kernel).
With no prompts, both encoders reproduce open_clip's `encode_image` / `encode_text`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, TextTransformer, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastprompt.kernels import reference as ref_ops
from fastprompt.kernels.decoupled_attention_sdpa import decoupled_attention_sdpa

from .backends import ATTENTION_BACKENDS, attention_backend_for

__all__ = ["ATTENTION_BACKENDS", "PromptAttention", "ImageEncoder", "TextEncoder", "attend"]


Prompts = Optional[torch.Tensor]  # [n, W] shared by the batch, or [B, n, W] per sample
LayerPrompts = Optional[Sequence[Prompts]]  # one entry per layer; None keeps the previous layer's tokens


@dataclass(frozen=True)
class PromptAttention:
    """How one layer's attention treats its prompt tokens (DPL's decoupled attention).

    The default (exact mixing for both row types, causal mask applied to every row) is standard
    attention. `instance_weight`/`prompt_weight` follow kernels.reference.decoupled_attention:
    a float c for `fixed`, a tensor of logits [H] for `learned`, None otherwise.
    """

    instance_mix: str = "exact"
    prompt_mix: str = "exact"
    instance_weight: Union[None, float, torch.Tensor] = None
    prompt_weight: Union[None, float, torch.Tensor] = None
    prompt_rows_see_all: bool = False

    def is_standard(self, causal: bool) -> bool:
        exact = self.instance_mix == "exact" and self.prompt_mix == "exact"
        return exact and (not causal or not self.prompt_rows_see_all)


LayerAttention = Union[None, PromptAttention, Sequence[Optional[PromptAttention]]]


def _triton_decoupled_attention_qkv():
    # Imported lazily: the Triton op needs a GPU or TRITON_INTERPRET=1, the other backends do not.
    from fastprompt.kernels.decoupled_attention import decoupled_attention_qkv

    return decoupled_attention_qkv


def attend(
    qkv: torch.Tensor,
    *,
    heads: int,
    backend: str,
    causal: bool,
    prompt_start: int = 0,
    num_prompts: int = 0,
    spec: Optional[PromptAttention] = None,
) -> torch.Tensor:
    """One layer's attention on the packed projection qkv [B, N, 3W] -> [B, N, W] (the out-projection's
    input) through the chosen backend."""
    standard = spec is None or num_prompts == 0 or spec.is_standard(causal)
    backend = attention_backend_for(backend, qkv, qkv.shape[-1] // (3 * heads))
    if backend == "triton":
        # The fused op reads q, k, v through strides and writes [B, N, W] (and, backward, d qkv) in
        # place: no layout copy. Standard attention dispatches to SDPA inside it.
        rules = {} if standard else dict(
            prompt_rows_see_all=spec.prompt_rows_see_all, instance_mix=spec.instance_mix, prompt_mix=spec.prompt_mix,
            instance_weight=spec.instance_weight, prompt_weight=spec.prompt_weight)
        return _triton_decoupled_attention_qkv()(qkv, num_heads=heads, prompt_start=prompt_start,
                                                 num_prompts=num_prompts, causal=causal, **rules)
    b, n, _ = qkv.shape
    q, k, v = qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    if standard:
        if backend == "reference":
            o = ref_ops.decoupled_attention(q, k, v, prompt_start=0, num_prompts=0, causal=causal)
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        # `sdpa`: the decomposition from fused SDPA calls (no score matrix); `reference`: the eager spec.
        op = decoupled_attention_sdpa if backend == "sdpa" else ref_ops.decoupled_attention
        o = op(
            q, k, v, prompt_start=prompt_start, num_prompts=num_prompts, causal=causal,
            prompt_rows_see_all=spec.prompt_rows_see_all, instance_mix=spec.instance_mix,
            prompt_mix=spec.prompt_mix, instance_weight=spec.instance_weight, prompt_weight=spec.prompt_weight,
        )
    return o.transpose(1, 2).reshape(b, n, -1)


def _check_blocks(transformer: nn.Module, tower: str) -> List[ResidualAttentionBlock]:
    blocks = list(transformer.resblocks)
    for i, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        if (
            not isinstance(block, ResidualAttentionBlock)
            or not isinstance(attn, nn.MultiheadAttention)
            or not attn.batch_first
            or not attn._qkv_same_embed_dim
            or hasattr(block, "ln_1_kv")
        ):
            raise ValueError(
                f"{tower} block {i} is a {type(block).__name__}; fastprompt's encoders support open_clip "
                "ResidualAttentionBlocks with batch-first nn.MultiheadAttention (standard CLIP ViTs)"
            )
    if not getattr(transformer, "batch_first", True):
        raise ValueError(f"{tower} transformer must run batch-first (open_clip >= 2.24 default)")
    return blocks


def _block_forward(block: ResidualAttentionBlock, x: torch.Tensor, attention: Callable) -> torch.Tensor:
    """open_clip's ResidualAttentionBlock forward, with the attention core swapped for `attention`
    (packed projection [B, N, 3W] -> [B, N, W])."""
    mha = block.attn
    qkv = F.linear(block.ln_1(x), mha.in_proj_weight, mha.in_proj_bias)
    o = attention(qkv)  # [B, N, width]
    x = x + block.ls_1(F.linear(o, mha.out_proj.weight, mha.out_proj.bias))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _layer_spec(attention: LayerAttention, layer: int) -> Optional[PromptAttention]:
    if attention is None or isinstance(attention, PromptAttention):
        return attention
    return attention[layer]


def _place_prompts(x: torch.Tensor, prompts: torch.Tensor, start: int, replace: bool) -> torch.Tensor:
    """Insert (replace=False) or overwrite (replace=True) prompt tokens at `start`."""
    n = prompts.shape[-2]
    if prompts.ndim == 2:
        prompts = prompts.unsqueeze(0).expand(x.shape[0], -1, -1)
    elif prompts.shape[0] != x.shape[0]:
        raise ValueError(f"per-sample prompts have batch {prompts.shape[0]}, tokens have batch {x.shape[0]}")
    prompts = prompts.to(x.dtype)
    tail = x[:, start + n :] if replace else x[:, start:]
    return torch.cat([x[:, :start], prompts, tail], dim=1)


def _check_layer_list(name: str, items, num_layers: int) -> None:
    if items is not None and not isinstance(items, PromptAttention) and len(items) != num_layers:
        raise ValueError(f"{name} must have one entry per layer ({num_layers}), got {len(items)}")


class _Encoder(nn.Module):
    def __init__(self, attention_backend: str):
        super().__init__()
        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend={attention_backend!r} is not one of {', '.join(ATTENTION_BACKENDS)}"
            )
        self.attention_backend = attention_backend

    def _run_blocks(self, x, blocks, *, causal, prompt_start, num_prompts, deep_prompts, attention):
        _check_layer_list("deep_prompts", deep_prompts, len(blocks))
        _check_layer_list("attention", attention, len(blocks))
        for i, block in enumerate(blocks):
            if i > 0 and deep_prompts is not None and deep_prompts[i] is not None:
                x = _place_prompts(x, deep_prompts[i], prompt_start, replace=True)
            spec = _layer_spec(attention, i)

            def layer_attention(qkv, spec=spec, heads=block.attn.num_heads):
                return attend(
                    qkv, heads=heads, backend=self.attention_backend, causal=causal,
                    prompt_start=prompt_start, num_prompts=num_prompts, spec=spec,
                )

            x = _block_forward(block, x, layer_attention)
        return x


class ImageEncoder(_Encoder):
    """open_clip VisionTransformer forward with optional visual prompt tokens.

    Prompts are inserted after the positional embedding and before `ln_pre` (as MaPLe does), at
    `prompt_position` "after_cls" (token 1, VPT-style) or "append" (after the patches, MaPLe).
    Layer i > 0 may overwrite them with `deep_prompts[i]`. They are dropped before pooling.
    """

    def __init__(self, clip_model: nn.Module, attention_backend: str = "auto"):
        super().__init__(attention_backend)
        visual = clip_model.visual
        if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
            raise ValueError(
                f"the image tower is a {type(visual).__name__}; prompted image encoding needs an open_clip "
                "VisionTransformer without attentional pooling (ViT-B/16, ViT-L/14, ...)"
            )
        self.visual = visual
        self.blocks = _check_blocks(visual.transformer, "image")
        self.num_layers = len(self.blocks)
        self.width = visual.transformer.width
        self.heads = self.blocks[0].attn.num_heads
        self.num_patches = visual.grid_size[0] * visual.grid_size[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def prompt_start(self, position: str) -> int:
        if position == "after_cls":
            return 1
        if position == "append":
            return 1 + self.num_patches
        raise ValueError(f"prompt_position={position!r} must be 'after_cls' or 'append'")

    def forward(
        self,
        images: torch.Tensor,
        *,
        prompts: Prompts = None,
        prompt_position: str = "append",
        deep_prompts: LayerPrompts = None,
        attention: LayerAttention = None,
    ) -> torch.Tensor:
        """images [B, 3, S, S] (normalised) -> image features [B, embed_dim], not normalised."""
        v = self.visual
        size = tuple(v.image_size) if isinstance(v.image_size, (tuple, list)) else (v.image_size, v.image_size)
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != size:
            raise ValueError(
                f"images must have shape [B, 3, {size[0]}, {size[1]}] for this model, got {tuple(images.shape)} "
                "(resize and centre-crop to the model's image size, e.g. fastprompt.data.eval_transform)"
            )
        if not images.is_floating_point():
            raise ValueError(
                f"images must be float tensors normalised with the model's mean/std (ClipBundle.mean/std), "
                f"got {images.dtype}"
            )
        if images.device != self.visual.conv1.weight.device:
            raise ValueError(f"images are on {images.device} but the model is on {self.visual.conv1.weight.device}")
        x = v.conv1(images.to(self.dtype))
        x = x.flatten(2).transpose(1, 2)  # [B, grid*grid, width]
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.patch_dropout(x)
        start, num_prompts = 0, 0
        if prompts is not None:
            start, num_prompts = self.prompt_start(prompt_position), prompts.shape[-2]
            x = _place_prompts(x, prompts, start, replace=False)
        x = v.ln_pre(x)
        x = self._run_blocks(
            x, self.blocks, causal=False, prompt_start=start, num_prompts=num_prompts,
            deep_prompts=deep_prompts, attention=attention,
        )
        if num_prompts:
            x = torch.cat([x[:, :start], x[:, start + num_prompts :]], dim=1)
        pooled, _ = v._pool(x)
        return pooled @ v.proj if v.proj is not None else pooled


class TextEncoder(_Encoder):
    """open_clip text transformer forward over token embeddings that may hold prompt vectors.

    Methods build [N, L, W] token embeddings (class-name tokens with context vectors at
    positions 1..n_ctx), and the index of the token that is pooled (end of text).
    With a causal mask and no prompt row reading ahead, positions after the last pooled token
    cannot influence the output, so they are cut off (`truncate`): exact, and much cheaper.
    """

    def __init__(self, clip_model: nn.Module, attention_backend: str = "auto"):
        super().__init__(attention_backend)
        tower = clip_model.text if hasattr(clip_model, "text") else clip_model
        if isinstance(tower, TextTransformer) and (tower.cls_emb is not None or tower.use_pad_mask):
            raise ValueError("text towers with a class token or padding mask (CoCa-style) are not supported")
        if not hasattr(tower, "token_embedding") or not hasattr(tower, "transformer"):
            raise ValueError(
                f"the text tower is a {type(tower).__name__}; fastprompt needs open_clip's own text transformer "
                "(not a Hugging Face text model)"
            )
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.text_projection = tower.text_projection
        self.pool_type = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
        self.eos_id = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))
        mask = getattr(tower, "attn_mask", None)
        self.causal = mask is not None
        if self.causal:
            expected = torch.full_like(mask, float("-inf")).triu(1)
            if not torch.equal(mask.float(), expected.float()):
                raise ValueError("the text tower's attention mask is not a causal mask; not supported")
        self.blocks = _check_blocks(self.transformer, "text")
        self.num_layers = len(self.blocks)
        self.width = self.transformer.width
        self.heads = self.blocks[0].attn.num_heads
        self.context_length = self.positional_embedding.shape[0]
        # Defaults for forward(): the official-style baseline turns truncation off (fastprompt.official);
        # `chunk_size` encodes at most that many prompts at a time (ImageNet-size class lists).
        self.truncate = True
        self.chunk_size: Optional[int] = None

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.get_cast_dtype()

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token ids [N, L] -> token embeddings [N, L, W] (no positional embedding)."""
        return self.token_embedding(token_ids).to(self.dtype)

    def pool_index(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Index [N] of the token whose output is the text feature (as open_clip's text_global_pool)."""
        n, length = token_ids.shape
        if self.pool_type == "argmax":
            return token_ids.argmax(dim=-1)
        if self.pool_type == "eos":
            return (token_ids == self.eos_id).int().argmax(dim=-1)
        if self.pool_type == "last":
            return torch.full((n,), length - 1, dtype=torch.long, device=token_ids.device)
        if self.pool_type == "first":
            return torch.zeros(n, dtype=torch.long, device=token_ids.device)
        raise ValueError(f"text pool type {self.pool_type!r} is not supported")

    def can_truncate(self, attention: LayerAttention = None, num_prompts: int = 0) -> bool:
        """Can positions after the last pooled token be dropped? Yes under a causal mask, pooling at
        or before the end of text, and no prompt row reading ahead (DPL's language conditioning)."""
        specs = [_layer_spec(attention, i) for i in range(self.num_layers)] if attention is not None else []
        reads_ahead = any(s is not None and s.prompt_rows_see_all for s in specs) and num_prompts > 0
        return self.causal and not reads_ahead and self.pool_type in ("argmax", "eos", "first")

    def forward(
        self,
        token_embeddings: torch.Tensor,
        pool_index: torch.Tensor,
        *,
        prompt_start: int = 1,
        num_prompts: int = 0,
        deep_prompts: LayerPrompts = None,
        attention: LayerAttention = None,
        truncate: Optional[bool] = None,
    ) -> torch.Tensor:
        """token_embeddings [N, L, W] (prompts already in place), pool_index [N] -> features [N, embed_dim].

        truncate: None uses `self.truncate`. With `self.chunk_size` set, the N prompts are encoded
        in chunks of that many rows; under autograd each chunk is checkpointed (its activations are
        recomputed in the backward), so peak memory follows the chunk, not N. Same values.
        """
        truncate = self.truncate if truncate is None else truncate
        n, length, _ = token_embeddings.shape
        if length > self.context_length:
            raise ValueError(f"text has {length} tokens, the model's context length is {self.context_length}")
        x = token_embeddings.to(self.dtype) + self.positional_embedding[:length].to(self.dtype)
        if truncate and self.can_truncate(attention, num_prompts):
            keep = max(int(pool_index.max()) + 1, prompt_start + num_prompts)
            x = x[:, :keep]
        rows = dict(prompt_start=prompt_start, num_prompts=num_prompts, deep_prompts=deep_prompts, attention=attention)
        chunk = self.chunk_size
        if not chunk or n <= chunk:
            return self._encode_rows(x, pool_index, **rows)
        parts = []
        for i in range(0, n, chunk):
            xs, ps = x[i : i + chunk], pool_index[i : i + chunk]
            if torch.is_grad_enabled():  # prompts (in x, deep prompts or learned mixing weights) may train
                parts.append(checkpoint(self._encode_rows, xs, ps, use_reentrant=False, **rows))
            else:
                parts.append(self._encode_rows(xs, ps, **rows))
        return torch.cat(parts)

    def _encode_rows(self, x, pool_index, *, prompt_start, num_prompts, deep_prompts, attention) -> torch.Tensor:
        """Positional-embedded tokens [n, L, W] -> pooled, projected features [n, embed_dim]."""
        n = x.shape[0]
        x = self._run_blocks(
            x, self.blocks, causal=self.causal, prompt_start=prompt_start, num_prompts=num_prompts,
            deep_prompts=deep_prompts, attention=attention,
        )
        x = self.ln_final(x)
        pooled = x[torch.arange(n, device=x.device), pool_index]
        if self.text_projection is None:
            return pooled
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(pooled)
        return pooled @ self.text_projection
