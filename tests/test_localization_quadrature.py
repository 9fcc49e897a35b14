"""Quadrature rules of integrated gradients (attribution.quadrature): the default
path is the one it always was, Gauss-Legendre is exact where it should be,
completeness, and on the real model the masks agree with the 20-step reference."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mke_lightning.localization.attribution import (
    QUADRATURES,
    AttributionConfig,
    attribute_rows,
    attribute_rows_loop,
    last_position_patch,
    quadrature_points,
)
from mke_lightning.localization.locate import LocalizationConfig
from mke_lightning.modeling.architectures import ArchSpec, mlp_out_modules
from mke_lightning.modeling.loading import ModelConfig, load_causal_lm


def _tiny(folder):
    return load_causal_lm(ModelConfig(name_or_path=str(folder)))


def _rows(tok):
    rows = [tok("the capital of france is")["input_ids"], tok("the tower is located in the city of")["input_ids"]]
    return rows, [tok.convert_tokens_to_ids("paris"), tok.convert_tokens_to_ids("rome")]


def _direct_even_ig(model, arch, row, target, steps) -> torch.Tensor:
    """The evenly spaced path written out: alpha = k/steps, k = 1..steps, zero baseline,
    every layer at once; ``[L, F]``."""
    modules = mlp_out_modules(model, arch)
    ids = torch.tensor([row])
    clean = {}
    with torch.no_grad(), last_position_patch(modules, lambda l, x: clean.__setitem__(l, x.detach().clone())):
        model(input_ids=ids)
    total = torch.zeros(len(modules), clean[0].shape[-1])
    for k in range(1, steps + 1):
        leaves = {l: (clean[l] * k / steps).requires_grad_(True) for l in clean}
        with last_position_patch(modules, lambda l, x, leaves=leaves: leaves[l]):
            prob = torch.softmax(model(input_ids=ids).logits[0, -1], -1)[target]
        for l, g in zip(leaves, torch.autograd.grad(prob, list(leaves.values()))):
            total[l] += g[0]
    return torch.stack([clean[l][0] for l in range(len(modules))]) * total / steps


# -- the default is the authors' evenly spaced path, unchanged ---------------------

@pytest.mark.parametrize("prefix_cache", [True, False], ids=["cached", "full"])
def test_default_is_the_evenly_spaced_path(tiny_llama_dir, prefix_cache):
    model, tok, arch = _tiny(tiny_llama_dir)
    rows, targets = _rows(tok)
    default = AttributionConfig(steps=6, batch_rows=5, prefix_cache=prefix_cache)
    assert default.quadrature == "right_riemann"
    got = attribute_rows(model, arch, rows, targets, default, pad_id=tok.pad_token_id)  # [2, L, F]
    named = attribute_rows(
        model, arch, rows, targets, replace(default, quadrature="right_riemann"), pad_id=tok.pad_token_id
    )
    loop = attribute_rows_loop(model, arch, rows, targets, default)
    assert torch.equal(got, named)
    for i, (row, tgt) in enumerate(zip(rows, targets)):
        ref = _direct_even_ig(model, arch, row, tgt, 6)
        assert (got[i] - ref).abs().max() < 1e-5 * max(1.0, float(ref.abs().max()))
        assert (loop[i] - ref).abs().max() < 1e-5 * max(1.0, float(ref.abs().max()))


def test_right_riemann_points_are_the_old_ones():
    nodes, weights = quadrature_points("right_riemann", 20)
    assert nodes == [k / 20 for k in range(1, 21)] and weights == [1.0] * 20


# -- the rules themselves --------------------------------------------------------

@pytest.mark.parametrize("points", [1, 2, 3, 5, 8])
def test_gauss_legendre_integrates_polynomials_of_degree_up_to_2n_minus_1(points):
    nodes, weights = quadrature_points("gauss_legendre", points)
    assert all(0.0 < x < 1.0 for x in nodes) and sum(weights) == pytest.approx(points)
    for degree in range(2 * points):
        estimate = sum(w * x**degree for x, w in zip(nodes, weights)) / points
        assert estimate == pytest.approx(1 / (degree + 1), rel=1e-12, abs=1e-14)
    estimate = sum(w * x ** (2 * points) for x, w in zip(nodes, weights)) / points
    assert abs(estimate - 1 / (2 * points + 1)) > 1e-13  # and no further (float64 rounding is about 1e-16)


@pytest.mark.parametrize("rule", QUADRATURES)
def test_every_rule_integrates_a_line_exactly(rule):
    nodes, weights = quadrature_points(rule, 4)
    assert len(nodes) == len(weights) == 4 and sum(weights) == pytest.approx(4)
    if rule != "right_riemann":  # the right Riemann sum leans to the path's end by half a step
        assert sum(w * (3 * x + 1) for x, w in zip(nodes, weights)) / 4 == pytest.approx(2.5)


def test_bad_quadrature_settings_say_which():
    with pytest.raises(ValueError, match="quadrature must be one of"):
        AttributionConfig(quadrature="simpson")
    with pytest.raises(ValueError, match="'trapezoid' needs steps >= 2"):
        AttributionConfig(quadrature="trapezoid", steps=1)


class _PolynomialLM(nn.Module):
    """A one-layer "language model" whose P(token 1) is a polynomial of the MLP-output input.

    The down projection (identity) reads the embedding of each token, ``x``
    ``[B, T, F]``; at the last position ``f(x) = 1 + sum_j w_j x_j^d`` and the
    logits are ``[log(C - f), log f]``, so P(token 1) = f(x) / C. Along the
    straight path alpha x from zero, the gradient is a polynomial of degree
    ``d - 1`` in alpha and the exact score of neuron j is ``w_j x_j^d / C``.
    """

    def __init__(self, degree: int, width: int = 5) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(8, width)
        self.embed.weight.data = torch.rand(8, width, generator=g) * 1.6 - 0.8  # |x| < 0.8
        mlp = nn.Module()
        mlp.down_proj = nn.Linear(width, width, bias=False)
        mlp.down_proj.weight.data = torch.eye(width)
        block = nn.Module()
        block.mlp = mlp
        self.layers = nn.ModuleList([block])
        self.w = torch.rand(width, generator=g) + 0.5  # [F]
        self.degree, self.total = degree, 4.0  # C: f < 1 + 1.5 * 5 * 0.8^d < 4 for d >= 6

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, use_cache=False, **_):
        x = self.layers[0].mlp.down_proj(self.embed(input_ids))  # [B, T, F]
        f = 1 + (self.w * x[:, -1] ** self.degree).sum(-1)  # [B]
        logits = torch.stack([torch.log(self.total - f), torch.log(f)], dim=-1)  # [B, 2]
        return SimpleNamespace(logits=logits[:, None, :])  # [B, 1, V]

    def exact_scores(self, row: list[int]) -> torch.Tensor:
        x = self.embed.weight[row[-1]].detach()  # [F]
        return (self.w * x**self.degree / self.total)[None]  # [L=1, F]


def _poly_scores(model, rule, points) -> torch.Tensor:
    cfg = AttributionConfig(steps=points, quadrature=rule, prefix_cache=False, batch_rows=4)
    rows = [[1, 3, 5], [2, 6], [4]]
    return attribute_rows(
        model, ArchSpec(layers="layers", mlp_out="mlp.down_proj"), rows, [1, 1, 1], cfg, pad_id=0
    ), rows


def test_gauss_legendre_is_exact_on_a_polynomial_path():
    """Degree 6: the gradient along the path has degree 5 = 2 x 3 - 1, so 3 Gauss-Legendre
    points are exact; 2 are not, nor is the right Riemann sum with 20."""
    model = _PolynomialLM(degree=6)
    exact = torch.stack([model.exact_scores(r) for r in [[1, 3, 5], [2, 6], [4]]])  # [3, 1, F]
    scale = float(exact.abs().max())
    gl3, _ = _poly_scores(model, "gauss_legendre", 3)
    assert (gl3 - exact).abs().max() < 1e-5 * scale
    gl2, _ = _poly_scores(model, "gauss_legendre", 2)
    even20, _ = _poly_scores(model, "right_riemann", 20)
    assert (gl2 - exact).abs().max() > 1e-3 * scale
    assert (even20 - exact).abs().max() > 1e-2 * scale


@pytest.mark.parametrize("rule", ["trapezoid", "midpoint"])
def test_low_order_rules_converge_on_the_polynomial_path(rule):
    model = _PolynomialLM(degree=6)
    exact = torch.stack([model.exact_scores(r) for r in [[1, 3, 5], [2, 6], [4]]])
    errors = [float((_poly_scores(model, rule, n)[0] - exact).abs().max()) for n in (4, 16)]
    assert errors[1] < errors[0] / 8  # second order: 4x the points, about 16x smaller


def test_completeness_on_a_tiny_llama(tiny_llama_dir):
    """All layers on one path: the scores sum to P(answer) at the activations minus at the zero
    baseline, once the integral is resolved; Gauss-Legendre gets there with fewer points."""
    model, tok, arch = _tiny(tiny_llama_dir)
    rows, targets = _rows(tok)
    modules = mlp_out_modules(model, arch)

    def prob(row, target, zero: bool) -> float:
        patch = (lambda l, x: torch.zeros_like(x)) if zero else (lambda l, x: None)
        with torch.no_grad(), last_position_patch(modules, patch):
            return float(torch.softmax(model(input_ids=torch.tensor([row])).logits[0, -1].float(), -1)[target])

    gaps = [prob(r, t, False) - prob(r, t, True) for r, t in zip(rows, targets)]
    err = {}
    for rule, points in [("gauss_legendre", 12), ("gauss_legendre", 4), ("right_riemann", 4)]:
        s = attribute_rows(
            model, arch, rows, targets, AttributionConfig(steps=points, quadrature=rule), pad_id=tok.pad_token_id
        )
        err[rule, points] = max(abs(float(s[i].sum()) - gap) for i, gap in enumerate(gaps))
    assert err["gauss_legendre", 12] < 1e-5 + 1e-3 * max(abs(g) for g in gaps)
    assert err["gauss_legendre", 4] < err["right_riemann", 4]


def test_batched_and_loop_agree_for_every_rule(tiny_llama_dir):
    model, tok, arch = _tiny(tiny_llama_dir)
    rows, targets = _rows(tok)
    for rule in QUADRATURES:
        for ig_path in ("all_layers", "per_layer"):
            cfg = AttributionConfig(steps=3, quadrature=rule, ig_path=ig_path, batch_rows=4)
            batched = attribute_rows(model, arch, rows, targets, cfg, pad_id=tok.pad_token_id)
            loop = attribute_rows_loop(model, arch, rows, targets, cfg)
            assert (batched - loop).abs().max() < 1e-4 * max(1.0, float(loop.abs().max())), (rule, ig_path)


def test_the_rule_is_part_of_the_mask_cache_key_except_at_its_default():
    from mke_lightning.localization.cache import _digest, settings_key

    base = LocalizationConfig(attribution=AttributionConfig(steps=10), cross_languages=["en", "zh", "fr"])
    keys = {
        rule: _digest(settings_key(replace(base, attribution=replace(base.attribution, quadrature=rule)), "en"))
        for rule in QUADRATURES
    }
    assert len(set(keys.values())) == len(QUADRATURES)
    assert "quadrature" not in settings_key(base, "en")["attribution"]


# -- the real model: the selected rule's masks against the 20-step reference -------

@pytest.mark.real_model
def test_real_model_gauss_legendre_masks_match_the_20_step_reference(real_model, mzsre_dir):
    """MzsRE records 0-2 with configs/mzsre/memla.yaml's localisation settings."""
    import itertools

    from mke_lightning.data.mzsre import MzsreParser
    from mke_lightning.data.source import RecordSource
    from mke_lightning.localization.locate import locate

    model, tok, arch = real_model
    records = list(itertools.islice(RecordSource(MzsreParser(mzsre_dir, ["en", "zh", "fr"])), 3))
    ref_cfg = LocalizationConfig(
        attribution=AttributionConfig(steps=20), threshold=0.3, cross_languages=["en", "zh", "fr"]
    )
    fast_cfg = replace(ref_cfg, attribution=replace(ref_cfg.attribution, quadrature=FAST[0], steps=FAST[1]))
    scores = []
    for record in records:
        ref, fast = (locate(model, tok, arch, record, "en", c) for c in (ref_cfg, fast_cfg))
        for cat in ("independent", "specific"):
            a = {(l, i) for l, idx in ref.category(cat).items() for i in idx}
            b = {(l, i) for l, idx in fast.category(cat).items() for i in idx}
            scores.append(1.0 if not a and not b else len(a & b) / len(a | b))
    assert sum(scores) / len(scores) >= MIN_MEAN_JACCARD, scores


FAST = ("gauss_legendre", 4)
"""The rule the benchmark selected (docs/benchmarks.md, "Integrated-gradient quadrature")."""
MIN_MEAN_JACCARD = 0.95
"""The target; the benchmark measured 1.0 on every record it ran, records 0-2 among them."""
