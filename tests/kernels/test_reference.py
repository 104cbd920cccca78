"""The reference ops against SDPA and against a direct, loop-by-loop float64 evaluation of the
formulas in docs/dpl.md and docs/methods.md (DePT)."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastprompt.kernels import reference as R

MIXES = ("exact", "fixed", "learned", "detached")


def _weight(mix, h):
    if mix == "fixed":
        return 0.3
    if mix == "learned":
        return torch.randn(h, dtype=torch.float64)
    return None


def dpl_by_the_formulas(q, k, v, *, ps, npr, causal, see_all, mixes, weights):
    """out, LSE_P, LSE_X row by row: Z_P, Z_X, O_P, O_X, then the row type's rule (docs/dpl.md)."""
    b, h, n, d = q.shape
    out = torch.zeros_like(q)
    lse_p = torch.full((b, h, n), -math.inf, dtype=q.dtype)
    lse_x = torch.full((b, h, n), -math.inf, dtype=q.dtype)
    prompt = set(range(ps, ps + npr))
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                row_is_prompt = i in prompt
                visible = [j for j in range(n) if not causal or j <= i or (see_all and row_is_prompt)]
                parts = {}
                for seg, keys in (("P", [j for j in visible if j in prompt]), ("X", [j for j in visible if j not in prompt])):
                    if not keys:
                        continue
                    s = torch.stack([q[bi, hi, i] @ k[bi, hi, j] for j in keys]) / math.sqrt(d)
                    z = torch.exp(s).sum()
                    o = sum(torch.exp(s[t]) / z * v[bi, hi, j] for t, j in enumerate(keys))
                    parts[seg] = (o, torch.log(z))
                if "P" in parts:
                    lse_p[bi, hi, i] = parts["P"][1]
                if "X" in parts:
                    lse_x[bi, hi, i] = parts["X"][1]
                if "P" not in parts:
                    w = 0.0
                elif "X" not in parts:
                    w = 1.0
                else:
                    role = "prompt" if row_is_prompt else "instance"
                    mix, weight = mixes[role], weights[role]
                    if mix in ("exact", "detached"):
                        w = torch.sigmoid(parts["P"][1] - parts["X"][1])
                    elif mix == "fixed":
                        w = weight
                    else:
                        w = torch.sigmoid(weight[hi])
                o_p = parts["P"][0] if "P" in parts else 0.0
                o_x = parts["X"][0] if "X" in parts else 0.0
                out[bi, hi, i] = (1 - w) * o_x + w * o_p
    return out, lse_p, lse_x


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("ps,npr", [(0, 0), (0, 3), (1, 4), (5, 2), (9, 2), (0, 11)])
@pytest.mark.parametrize("see_all", [False, True])
def test_exact_equals_sdpa(causal, ps, npr, see_all):
    q, k, v = (torch.randn(2, 3, 11, 16, dtype=torch.float64) for _ in range(3))
    out = R.decoupled_attention(q, k, v, prompt_start=ps, num_prompts=npr, causal=causal, prompt_rows_see_all=see_all)
    if causal and see_all and npr:
        mask = R.visibility_mask(11, prompt_start=ps, num_prompts=npr, causal=True, prompt_rows_see_all=True)
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("instance_mix", MIXES)
@pytest.mark.parametrize("prompt_mix", MIXES)
@pytest.mark.parametrize("causal,see_all", [(False, False), (True, False), (True, True)])
def test_every_mix_against_the_formulas(instance_mix, prompt_mix, causal, see_all):
    b, h, n, d = 1, 2, 7, 8
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for _ in range(3))
    weights = {"instance": _weight(instance_mix, h), "prompt": _weight(prompt_mix, h)}
    for ps, npr in ((1, 2), (4, 3)):
        out, lse_p, lse_x = R.decoupled_attention(
            q, k, v, prompt_start=ps, num_prompts=npr, causal=causal, prompt_rows_see_all=see_all,
            instance_mix=instance_mix, prompt_mix=prompt_mix, instance_weight=weights["instance"],
            prompt_weight=weights["prompt"], return_lse=True,
        )
        exp_out, exp_p, exp_x = dpl_by_the_formulas(
            q, k, v, ps=ps, npr=npr, causal=causal, see_all=see_all,
            mixes={"instance": instance_mix, "prompt": prompt_mix}, weights=weights,
        )
        torch.testing.assert_close(out, exp_out, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(lse_p, exp_p, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(lse_x, exp_x, rtol=1e-10, atol=1e-12)


def test_rows_that_see_no_prompt_use_instances_only():
    # Causal text: the start token (row 0) sees no prompt at positions 1..4; w must be 0, not 0/0.
    q, k, v = (torch.randn(1, 2, 9, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out, lse_p, lse_x = R.decoupled_attention(
        q, k, v, prompt_start=1, num_prompts=4, causal=True, instance_mix="fixed", instance_weight=0.9, return_lse=True
    )
    assert torch.isinf(lse_p[..., 0]).all() and torch.isfinite(lse_x).all()
    torch.testing.assert_close(out[..., 0, :], v[..., 0, :])  # row 0 sees only itself
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_all_prompt_sequence_and_no_prompts():
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64) for _ in range(3))
    full = R.decoupled_attention(q, k, v, prompt_start=0, num_prompts=5, instance_mix="fixed", instance_weight=0.2, prompt_mix="fixed", prompt_weight=0.2)
    torch.testing.assert_close(full, F.scaled_dot_product_attention(q, k, v))  # w = 1 on every row
    none = R.decoupled_attention(q, k, v, prompt_start=3, num_prompts=0, instance_mix="fixed", instance_weight=0.7)
    torch.testing.assert_close(none, F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("instance_mix,prompt_mix", [("exact", "exact"), ("fixed", "exact"), ("learned", "fixed"), ("exact", "learned")])
@pytest.mark.parametrize("causal,see_all", [(False, False), (True, True)])
def test_gradcheck(instance_mix, prompt_mix, causal, see_all):
    h = 2
    q, k, v = (torch.randn(1, h, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    iw, pw = _weight(instance_mix, h), _weight(prompt_mix, h)
    thetas = [w.requires_grad_() for w in (iw, pw) if isinstance(w, torch.Tensor)]

    def f(q, k, v, *thetas):
        it = iter(thetas)
        a = next(it) if isinstance(iw, torch.Tensor) else iw
        b = next(it) if isinstance(pw, torch.Tensor) else pw
        out, lse_p, lse_x = R.decoupled_attention(
            q, k, v, prompt_start=1, num_prompts=2, causal=causal, prompt_rows_see_all=see_all,
            instance_mix=instance_mix, prompt_mix=prompt_mix, instance_weight=a, prompt_weight=b, return_lse=True,
        )
        # -inf LSEs (rows that see no prompt) have no finite-difference derivative: compare the finite ones.
        return out, torch.where(torch.isfinite(lse_p), lse_p, 0.0), lse_x

    assert torch.autograd.gradcheck(f, (q, k, v, *thetas))


def test_detached_mix_has_no_gradient_through_w():
    q, k, v = (torch.randn(1, 2, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    kw = dict(prompt_start=2, num_prompts=2)
    out = R.decoupled_attention(q, k, v, instance_mix="detached", prompt_mix="detached", **kw)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    # The same with w frozen at its value: build it from the LSEs and treat it as a constant.
    _, lse_p, lse_x = R.decoupled_attention(q, k, v, return_lse=True, **kw)
    w = torch.sigmoid(lse_p - lse_x).detach().unsqueeze(-1)
    o_p = R.decoupled_attention(q, k, v, instance_mix="fixed", instance_weight=1.0, prompt_mix="fixed", prompt_weight=1.0, **kw)
    o_x = R.decoupled_attention(q, k, v, instance_mix="fixed", instance_weight=0.0, prompt_mix="fixed", prompt_weight=0.0, **kw)
    expected = torch.autograd.grad(((1 - w) * o_x + w * o_p).sum(), (q, k, v))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


def test_half_inputs_computed_in_float32():
    q, k, v = (torch.randn(2, 2, 13, 16).to(torch.bfloat16) for _ in range(3))
    out, lse_p, _ = R.decoupled_attention(q, k, v, prompt_start=1, num_prompts=3, return_lse=True)
    assert out.dtype == torch.bfloat16 and lse_p.dtype == torch.float32
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert (out.double() - expected).abs().max() < 2e-2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(q=torch.randn(2, 3, 4)), "q must have 4 dimensions"),
        (dict(k=torch.randn(1, 2, 5, 8)), "q, k and v must all have shape"),
        (dict(prompt_start=5, num_prompts=2), "out of bounds"),
        (dict(num_prompts=-1), "num_prompts must be >= 0"),
        (dict(instance_mix="soft"), "instance_mix='soft' is not a mixing rule"),
        (dict(instance_mix="fixed"), "needs instance_weight"),
        (dict(instance_mix="fixed", instance_weight=1.5), "outside \\[0, 1\\]"),
        (dict(prompt_mix="learned", prompt_weight=torch.zeros(3)), "prompt_weight must have shape \\[2\\]"),
        (dict(prompt_weight=0.5), "takes no weight"),
        (dict(q=torch.randint(0, 3, (1, 2, 6, 8))), "unsupported dtype"),
        (dict(scale=-1.0), "scale must be a positive"),
    ],
)
def test_bad_input(kwargs, match):
    args = dict(q=torch.randn(1, 2, 6, 8), k=torch.randn(1, 2, 6, 8), v=torch.randn(1, 2, 6, 8), prompt_start=1, num_prompts=2)
    args.update(kwargs)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(ValueError, match=match):
        R.decoupled_attention(q, k, v, **args)


# --- DePT's CAT head ---------------------------------------------------------------------------

def _cat_inputs(b, c, d, per_image=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(b * 100 + c)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(
        image_features=r(b, d),
        text_features=r(b, c, d) if per_image else r(c, d),
        labels=torch.randint(0, c, (b,), generator=g),
        gamma_img=1 + 0.1 * r(d), beta_img=0.1 * r(d), gamma_txt=1 + 0.1 * r(d), beta_txt=0.1 * r(d),
        weight=r(c, d) / math.sqrt(d), bias=0.1 * r(c), logit_scale=100.0,
    )


def dept_by_the_formulas(x, lam):
    """DePT's training loss (docs/methods.md) written out sample by sample in float64."""
    f_i, f_t, y = x["image_features"], x["text_features"], x["labels"]
    b = f_i.shape[0]
    ce = lambda z, t: torch.logsumexp(z, 0) - z[t]  # noqa: E731
    itm, cat = 0.0, 0.0
    for n in range(b):
        t_feats = f_t[n] if f_t.ndim == 3 else f_t
        cos = torch.stack([f_i[n] @ t / (f_i[n].norm() * t.norm()) for t in t_feats])
        itm = itm + ce(x["logit_scale"] * cos, y[n])
        g_t = x["gamma_txt"] * t_feats[y[n]] + x["beta_txt"]
        g_i = x["gamma_img"] * f_i[n] + x["beta_img"]
        cat = cat + ce(x["weight"] @ g_t + x["bias"], y[n]) + ce(x["weight"] @ g_i + x["bias"], y[n])
    return (1 - lam) * itm / b + lam * cat / (2 * b)


@pytest.mark.parametrize("b,c,d", [(1, 2, 8), (3, 5, 16), (6, 11, 32)])
@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("lam", [0.0, 0.7, 1.0])
def test_cat_head_loss_against_the_formulas(b, c, d, per_image, lam):
    x = _cat_inputs(b, c, d, per_image)
    loss = R.cat_head_loss(**x, lam=lam)
    torch.testing.assert_close(loss, dept_by_the_formulas(x, lam), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("per_image", [False, True])
def test_cat_head_loss_gradcheck(per_image):
    x = _cat_inputs(3, 4, 6, per_image)
    names = ["image_features", "text_features", "gamma_img", "beta_img", "gamma_txt", "beta_txt", "weight", "bias"]
    tensors = [x[n].requires_grad_() for n in names]

    def f(*ts):
        return R.cat_head_loss(**{**x, **dict(zip(names, ts))}, lam=0.7)

    assert torch.autograd.gradcheck(f, tensors)


def test_cat_head_logits_fused_and_cat_only():
    x = _cat_inputs(4, 5, 8)
    x.pop("labels"), x.pop("gamma_txt"), x.pop("beta_txt")
    z_cat = (x["gamma_img"] * x["image_features"] + x["beta_img"]) @ x["weight"].t() + x["bias"]
    z_itm = 100.0 * F.normalize(x["image_features"], dim=-1) @ F.normalize(x["text_features"], dim=-1).t()
    torch.testing.assert_close(R.cat_head_logits(**x, fuse=False), z_cat)
    torch.testing.assert_close(R.cat_head_logits(**x, lam=0.7), 0.3 * z_itm + 0.7 * z_cat)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(labels=torch.tensor([0, 5, 1])), "labels must lie in \\[0, 5\\)"),
        (dict(text_features=torch.randn(5, 7, dtype=torch.float64)), "text_features must have shape"),
        (dict(weight=torch.randn(4, 8, dtype=torch.float64)), "classifier rows"),
        (dict(gamma_img=torch.ones(7, dtype=torch.float64)), "gamma_img must have shape \\[8\\]"),
        (dict(logit_scale=-1.0), "logit_scale must be the positive"),
        (dict(lam=1.5), "lam must be a float in \\[0, 1\\]"),
        (dict(image_features=torch.full((3, 8), float("nan"), dtype=torch.float64)), "NaN"),
        (dict(labels=torch.tensor([0.0, 1.0, 2.0])), "labels has unsupported dtype"),
    ],
)
def test_cat_head_bad_input(change, match):
    x = _cat_inputs(3, 5, 8)
    x.update(change)
    with pytest.raises(ValueError, match=match):
        R.cat_head_loss(**x)
