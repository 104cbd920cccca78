"""The pretraining recipe: its loss against a float64 loop, and bit-reproducibility from a seed."""
import math

import torch

from fastprompt.world.pretrain import Recipe, multi_positive_clip_loss, pretrain, tensors_digest


def test_multi_positive_loss_matches_a_loop_in_float64():
    g = torch.Generator().manual_seed(0)
    fi, ft = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    pos = torch.rand(7, 7, generator=g) < 0.3
    pos.fill_diagonal_(True)
    scale = torch.tensor(9.0, dtype=torch.float64)
    got = multi_positive_clip_loss(fi, ft, pos, scale)
    sim = [[scale.item() * float(fi[i] @ ft[j] / fi[i].norm() / ft[j].norm()) for j in range(7)] for i in range(7)]
    img = [-math.log(sum(math.exp(sim[i][j]) for j in range(7) if pos[i, j]) / sum(math.exp(s) for s in sim[i]))
           for i in range(7)]
    txt = [-math.log(sum(math.exp(sim[i][j]) for i in range(7) if pos[i, j]) / sum(math.exp(sim[i][j]) for i in range(7)))
           for j in range(7)]
    assert abs(float(got) - 0.5 * (sum(img) / 7 + sum(txt) / 7)) < 1e-12


def test_the_same_recipe_gives_the_same_weights_and_another_seed_others():
    recipe = Recipe(steps=3, batch_size=16, warmup_steps=1, threads=1)
    a, rec_a = pretrain(recipe, log_every=0)
    b, _ = pretrain(recipe, log_every=0)
    c, _ = pretrain(Recipe(steps=3, batch_size=16, warmup_steps=1, threads=1, seed=1), log_every=0)
    assert tensors_digest(a.state_dict()) == tensors_digest(b.state_dict())
    assert tensors_digest(a.state_dict()) != tensors_digest(c.state_dict())
    assert math.isfinite(rec_a["final_loss"]) and rec_a["trained_token_rows"] < 60
    rows = (a.token_embedding.weight != 0).any(dim=1)
    assert int(rows.sum()) == rec_a["trained_token_rows"]  # untrained rows are zero
    assert not a.training and all(not p.is_cuda for p in a.parameters())
