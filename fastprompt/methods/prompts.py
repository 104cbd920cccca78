"""Learnable prompt tokens, shared by the methods.

* `TextPrompts`: context vectors at text positions 1..n_ctx (CoOp), optionally deep: fresh
  vectors replace them at layers 1..depth-1 (MaPLe, DPL).
* `CoupledVisionPrompts`: visual prompts that are linear projections of the text prompts of the
  same layer (MaPLe's multi-modal coupling), appended after the patches.
* `VisionPrompts`: independent deep visual prompts (VPT-deep; DPL's visual variant).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from fastprompt.encoders import TextEncoder
from fastprompt.errors import ClassNamesError

__all__ = ["tokenize_class_prompts", "ClassTokens", "init_context", "TextPrompts", "CoupledVisionPrompts", "VisionPrompts", "layer_list"]


def layer_list(shallow_and_deep: Sequence[Optional[torch.Tensor]], num_layers: int) -> Optional[List]:
    """Per-layer deep prompts for the encoders: entry i replaces the prompts before layer i.

    Entry 0 (the shallow prompts) is inserted at the embedding, so it is None here; layers past
    the prompt depth keep the tokens the previous layer produced.
    """
    deep = list(shallow_and_deep[1:])
    if not deep:
        return None
    return [None] + deep + [None] * (num_layers - 1 - len(deep))


def check_depth(depth: int, *num_layers: int) -> None:
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= min(num_layers):
        raise ValueError(f"depth must be an int between 1 and {min(num_layers)} (the encoders' layers), got {depth!r}")


def tokenize_class_prompts(tokenizer, prompts: Sequence[str], classnames: Sequence[str], context_length: int) -> torch.Tensor:
    """Token ids [C, context_length] of one prompt per class, refusing what the tokenizer would get
    wrong silently: a prompt longer than the context (its end, the class name included, would be cut,
    and different names could become the same tokens) and two classes with identical tokens (the
    tokenizer lower-cases and cleans punctuation, so 'Cat' and 'cat' are one prompt)."""
    ids = tokenizer(list(prompts), context_length=context_length + 1)  # one spare position tells a cut
    too_long = [(name, prompt) for name, prompt, row in zip(classnames, prompts, ids) if int(row[context_length]) != 0]
    if too_long:
        shown = "; ".join(f"{name!r} (prompt {prompt!r})" for name, prompt in too_long[:3])
        raise ClassNamesError(
            f"{len(too_long)} class prompt(s) do not fit the text encoder's context of {context_length} tokens "
            f"and would be cut: {shown}. Shorten those class names (or use fewer context tokens)"
        )
    ids = ids[:, :context_length].contiguous()
    seen = {}
    for name, row in zip(classnames, ids.tolist()):
        key = tuple(row)
        if key in seen:
            raise ClassNamesError(f"classes {seen[key]!r} and {name!r} get identical prompt tokens (the tokenizer "
                             "lower-cases and cleans punctuation); rename one of them")
        seen[key] = name
    return ids


class ClassTokens(nn.Module):
    """Token embeddings of "<prefix> <class name>." for every class, with n_ctx learnable slots.

    The prefix is `n_ctx` placeholder tokens ("X X ... X", CoOp) or an init phrase such as
    "a photo of a" whose first n_ctx tokens are learnable (MaPLe keeps the rest fixed). The frozen
    parts (start token, fixed words, class name, end token) are computed once per class list.
    """

    def __init__(self, text_encoder: TextEncoder, tokenizer, classnames: Sequence[str], n_ctx: int, prefix: str):
        super().__init__()
        self.n_ctx = n_ctx
        self.num_classes = len(classnames)
        device = text_encoder.token_embedding.weight.device
        prompts = [f"{prefix} {name}." for name in classnames]
        token_ids = tokenize_class_prompts(tokenizer, prompts, classnames, text_encoder.context_length).to(device)
        with torch.no_grad():
            embeddings = text_encoder.embed(token_ids)  # [C, L, W]
        self.register_buffer("token_ids", token_ids, persistent=False)
        self.register_buffer("prefix", embeddings[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", embeddings[:, 1 + n_ctx :].clone(), persistent=False)
        self.register_buffer("pool_index", text_encoder.pool_index(token_ids), persistent=False)
        # A causal encoder's pooled output never sees positions past the longest prompt's end of
        # text: a copy of the suffix cut there, found once on the host (no device sync per step),
        # rounded up to a multiple of 8 positions (tensor-core friendly shapes).
        longest = int(self.pool_index.max()) + 1
        keep = max(min(token_ids.shape[1], -(-longest // 8) * 8), 1 + n_ctx)
        self.cut_suffix_length = keep - 1 - n_ctx  # `suffix` sliced there (a view, no second copy)

    def assemble(self, ctx: torch.Tensor, cut: bool = False) -> torch.Tensor:
        """ctx [n_ctx, W] -> [C, L, W]; per-sample ctx [B, n_ctx, W] -> [B*C, L, W] (sample-major).

        cut=True ends the prompts after `cut_suffix_length` suffix tokens (for encoders that can truncate: same features)."""
        c = self.num_classes
        suffix = self.suffix[:, : self.cut_suffix_length] if cut else self.suffix
        if ctx.ndim == 2:
            ctx = ctx.to(self.prefix.dtype).unsqueeze(0).expand(c, -1, -1)
            return torch.cat([self.prefix, ctx, suffix], dim=1)
        b = ctx.shape[0]
        ctx = ctx.to(self.prefix.dtype).unsqueeze(1).expand(b, c, -1, -1)
        prefix = self.prefix.unsqueeze(0).expand(b, -1, -1, -1)
        suffix = suffix.unsqueeze(0).expand(b, -1, -1, -1)
        return torch.cat([prefix, ctx, suffix], dim=2).flatten(0, 1)


def init_context(text_encoder: TextEncoder, tokenizer, n_ctx: Optional[int], ctx_init: Optional[str], std: float):
    """Initial context vectors [n_ctx, W] (fp32) and the prompt prefix text.

    With `ctx_init` the vectors are the phrase's token embeddings (n_ctx of them: all by default,
    fewer keeps the rest as fixed words); otherwise N(0, std) with n_ctx "X" placeholders.
    """
    if ctx_init:
        phrase = ctx_init.replace("_", " ").strip()
        ids = tokenizer([phrase]).to(text_encoder.token_embedding.weight.device)
        n_tokens = int(text_encoder.pool_index(ids)[0]) - 1  # tokens between start and end of text
        if n_ctx is None:
            n_ctx = n_tokens
        if not 1 <= n_ctx <= n_tokens:
            raise ValueError(f"n_ctx={n_ctx} must be between 1 and the {n_tokens} tokens of ctx_init={ctx_init!r}")
        with torch.no_grad():
            vectors = text_encoder.embed(ids)[0, 1 : 1 + n_ctx].float().clone()
        return vectors, phrase
    if n_ctx is None or n_ctx < 1:
        raise ValueError(f"n_ctx must be a positive int when ctx_init is not given, got {n_ctx!r}")
    vectors = torch.empty(n_ctx, text_encoder.width).normal_(0.0, std)
    return vectors, " ".join(["X"] * n_ctx)


class TextPrompts(nn.Module):
    """Context vectors [n_ctx, W] at text positions 1..n_ctx of every class prompt, plus deep ones.

    `deep[i-1]` replaces the context tokens before text layer i (i = 1..depth-1), initialised
    N(0, 0.02) as MaPLe does.
    """

    def __init__(
        self,
        text_encoder: TextEncoder,
        tokenizer,
        classnames: Sequence[str],
        *,
        n_ctx: Optional[int],
        ctx_init: Optional[str],
        ctx_std: float,
        depth: int = 1,
    ):
        super().__init__()
        check_depth(depth, text_encoder.num_layers)
        if ctx_std <= 0:
            raise ValueError(f"ctx_std must be > 0, got {ctx_std}")
        vectors, self.prefix_text = init_context(text_encoder, tokenizer, n_ctx, ctx_init, ctx_std)
        device = text_encoder.token_embedding.weight.device
        self.n_ctx = vectors.shape[0]
        self.depth = depth
        self.num_layers = text_encoder.num_layers
        self.ctx = nn.Parameter(vectors.to(device))
        self.deep = nn.ParameterList(
            nn.Parameter(torch.empty(self.n_ctx, text_encoder.width, device=device).normal_(0.0, 0.02))
            for _ in range(depth - 1)
        )
        self.set_classnames(text_encoder, tokenizer, classnames)

    def set_classnames(self, text_encoder: TextEncoder, tokenizer, classnames: Sequence[str]) -> None:
        self.class_tokens = ClassTokens(text_encoder, tokenizer, classnames, self.n_ctx, self.prefix_text)

    def layers(self) -> List[torch.Tensor]:
        """[shallow ctx, deep ctx of layer 1, ..., layer depth-1]."""
        return [self.ctx, *self.deep]

    def encode(
        self, text_encoder: TextEncoder, *, shift: Optional[torch.Tensor] = None, attention=None
    ) -> torch.Tensor:
        """Class text features [C, d]; with a per-sample context shift [B, W] (CoCoOp) [B, C, d]."""
        tokens = self.class_tokens
        ctx = self.ctx if shift is None else self.ctx.unsqueeze(0) + shift.unsqueeze(1)
        cut = text_encoder.truncate and text_encoder.can_truncate(attention, self.n_ctx)
        embeddings = tokens.assemble(ctx, cut=cut)
        pool_index = tokens.pool_index if shift is None else tokens.pool_index.repeat(shift.shape[0])
        features = text_encoder(
            embeddings, pool_index, prompt_start=1, num_prompts=self.n_ctx,
            deep_prompts=layer_list(self.layers(), self.num_layers), attention=attention,
            truncate=False if cut else None,  # already cut: no need to look at pool_index again
        )
        return features if shift is None else features.view(shift.shape[0], tokens.num_classes, -1)


class CoupledVisionPrompts(nn.Module):
    """MaPLe's coupling: the visual prompts of layer i are Linear_i(text prompts of layer i)."""

    def __init__(self, text_prompts: TextPrompts, text_width: int, vision_width: int, vision_layers: int):
        super().__init__()
        check_depth(text_prompts.depth, vision_layers)
        device = text_prompts.ctx.device
        self.projections = nn.ModuleList(
            nn.Linear(text_width, vision_width, device=device) for _ in range(text_prompts.depth)
        )

    def layers(self, text_prompts: TextPrompts) -> List[torch.Tensor]:
        return [proj(ctx) for proj, ctx in zip(self.projections, text_prompts.layers())]


class VisionPrompts(nn.Module):
    """Independent visual prompt tokens [n, W] for layers 0..depth-1 (VPT-deep)."""

    def __init__(self, n_ctx: int, width: int, depth: int, vision_layers: int, *, device=None, std: float = 0.02):
        super().__init__()
        check_depth(depth, vision_layers)
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
            raise ValueError(f"the number of visual prompt tokens must be a positive int, got {n_ctx!r}")
        self.tokens = nn.ParameterList(
            nn.Parameter(torch.empty(n_ctx, width, device=device).normal_(0.0, std)) for _ in range(depth)
        )

    def layers(self) -> List[torch.Tensor]:
        return list(self.tokens)
