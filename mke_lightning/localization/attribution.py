"""Neuron attribution: which MLP neurons carry the answer to a prompt.

Scores are taken at the input of each layer's MLP output projection (the
quantity an edit of a value vector multiplies), at the last prompt position.

* ``integrated_gradients``: score = (a - b) x mean gradient of P(answer token)
  along the straight path from a baseline ``b`` to the activation ``a``,
  estimated at ``steps`` points of the path by the rule ``quadrature``:
  ``right_riemann`` (the default and the authors' rule: alpha = k/steps,
  k = 1..steps, equal weights), ``gauss_legendre`` (the Gauss-Legendre nodes
  and weights on [0, 1]: exact for an integrand that is a polynomial of degree
  <= 2 steps - 1, so a smooth path needs few points), ``trapezoid`` (both ends
  and steps - 2 evenly spaced points between) or ``midpoint``
  (alpha = (k - 1/2)/steps). Baseline ``zero``, or ``eos``: the mean
  activation over copies of the prompt with one token at a time replaced by
  EOS (the MEMLA authors' choice).

  ``ig_path: per_layer`` scales one layer at a time while the others run
  normally (the authors' way: one path per layer, ``L x steps`` rows per
  prompt). ``ig_path: all_layers`` scales every layer's last-position
  activation at once along one path (``steps`` rows per prompt, about L times
  cheaper).
* ``grad_x_act``: activation x gradient, one forward and backward pass.
* ``activation``: the activation's magnitude ``|a|`` at the last prompt
  position, no gradient and no answer (LAFN's "magnitude analysis").

With ``prefix_cache`` (default) the prompt's first T-1 tokens run once and
every row runs only its last token against their cached keys and values:
exact, because the patch touches the last position only.

Multi-token answers are handled as the authors do: for answer token j the
input is the prompt followed by the model's own first j greedy tokens, and the
scores of all answer tokens are summed. Every (prompt, answer token, step) row
of a call is batched into as few forward/backward passes as the memory budget
allows (``memory_budget_mb``, or a fixed ``batch_rows``).

:func:`attribute_rows_loop` computes the same scores the plain way, one pass
per row and step; tests and ``bench/localization_speed.py`` compare the two.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Literal, Sequence, get_args

import numpy as np
import torch

from mke_lightning.modeling.architectures import ArchSpec, mlp_out_modules, neuron_dim, num_neurons, weight_shape
from mke_lightning.modeling.forward import left_pad

IG_PATHS = ("all_layers", "per_layer")
BASELINES = ("zero", "eos")
Quadrature = Literal["right_riemann", "gauss_legendre", "trapezoid", "midpoint"]
QUADRATURES: tuple[str, ...] = get_args(Quadrature)


def quadrature_points(rule: str, points: int) -> tuple[list[float], list[float]]:
    """Nodes ``alpha`` in [0, 1] and weights of ``rule`` with ``points`` points: two lists of length ``points``.

    The weights are relative to an even step of ``1/points``: they sum to
    ``points``, and the integral of ``g`` over [0, 1] is estimated as
    ``sum(w_k g(alpha_k)) / points``. ``right_riemann``'s weights are all
    exactly 1 and its nodes ``k / points``, so its sums are the same floats as
    before there was a choice of rule.
    """
    if rule not in QUADRATURES:
        raise ValueError(f"quadrature must be one of {QUADRATURES}, got {rule!r}")
    if points < 1 or (rule == "trapezoid" and points < 2):
        raise ValueError(f"quadrature {rule!r} needs at least {2 if rule == 'trapezoid' else 1} points, got {points}")
    if rule == "right_riemann":
        return [k / points for k in range(1, points + 1)], [1.0] * points
    if rule == "midpoint":
        return [(k - 0.5) / points for k in range(1, points + 1)], [1.0] * points
    if rule == "trapezoid":
        inner = points - 1  # intervals between the points
        nodes = [k / inner for k in range(points)]
        weights = [points / inner * (0.5 if k in (0, inner) else 1.0) for k in range(points)]
        return nodes, weights
    x, w = np.polynomial.legendre.leggauss(points)  # nodes on [-1, 1], weights summing to 2
    return [float(v) for v in (x + 1) / 2], [float(v) for v in w / 2 * points]


@dataclass
class AttributionConfig:
    """How neuron scores are computed."""

    method: str = "integrated_gradients"
    """``integrated_gradients``, ``grad_x_act`` (one pass) or ``activation`` (magnitude, LAFN)."""
    ig_path: str = "all_layers"
    """``all_layers`` (one path scaling every layer) or ``per_layer`` (one path per layer, the authors' way)."""
    steps: int = 20
    """Points per path at which the gradient is taken (the authors use 20 with ``right_riemann``).

    The cost of integrated gradients is proportional to it, whatever the rule."""
    quadrature: Quadrature = "right_riemann"
    """How the path integral is estimated from the ``steps`` points.

    ``right_riemann``: alpha = k/steps, k = 1..steps, equal weights (the
    authors' rule, and the default). ``gauss_legendre``: Gauss-Legendre nodes
    and weights on [0, 1], exact when the gradient along the path is a
    polynomial of degree <= 2 steps - 1; the gradient of a smooth network
    along a straight path is close to one, so a few points reach what the
    right Riemann sum reaches with many (docs/benchmarks.md, "Integrated-
    gradient quadrature"). ``trapezoid``: the path's two ends and steps - 2
    evenly spaced points between them (steps >= 2). ``midpoint``: alpha =
    (k - 1/2)/steps."""
    baseline: str = "zero"
    """``zero`` or ``eos`` (mean activation with each token replaced by EOS)."""
    memory_budget_mb: float = 1024.0
    """Memory one forward/backward pass may use, in MiB: sets the rows per pass.

    The size of a row is estimated from the model's shapes (logits, saved
    activations, prefix cache copy); see :func:`rows_per_pass`."""
    batch_rows: int | None = None
    """Fixed rows per forward/backward pass; overrides ``memory_budget_mb`` when set."""
    prefix_cache: bool = True
    """Run each prompt's prefix once and every IG row as one cached token.

    Patching the last position changes nothing before it (causal attention),
    so the rows of a prompt share the keys/values of its first T-1 tokens:
    a row then costs one token instead of T. Off: every row runs in full."""

    def __post_init__(self) -> None:
        if self.method not in ATTRIBUTIONS:
            raise ValueError(f"attribution.method must be one of {tuple(ATTRIBUTIONS)}, got {self.method!r}")
        if self.ig_path not in IG_PATHS:
            raise ValueError(f"attribution.ig_path must be one of {IG_PATHS}, got {self.ig_path!r}")
        if self.baseline not in BASELINES:
            raise ValueError(f"attribution.baseline must be one of {BASELINES}, got {self.baseline!r}")
        if self.steps < 1:
            raise ValueError(f"attribution.steps must be >= 1, got {self.steps}")
        if self.quadrature not in QUADRATURES:
            raise ValueError(f"attribution.quadrature must be one of {QUADRATURES}, got {self.quadrature!r}")
        if self.quadrature == "trapezoid" and self.steps < 2:
            raise ValueError(f"attribution.quadrature 'trapezoid' needs steps >= 2, got {self.steps}")
        if self.batch_rows is not None and self.batch_rows < 1:
            raise ValueError(f"attribution.batch_rows must be >= 1 or null, got {self.batch_rows}")
        if self.memory_budget_mb <= 0:
            raise ValueError(f"attribution.memory_budget_mb must be > 0, got {self.memory_budget_mb}")

    @property
    def needs_answer(self) -> bool:
        """Whether scores depend on the answer (all methods but ``activation``)."""
        return ATTRIBUTIONS[self.method].needs_answer


@contextmanager
def last_position_patch(modules: Sequence[torch.nn.Module], fn: Callable[[int, torch.Tensor], torch.Tensor | None]):
    """Call ``fn(layer, x_last)`` on the MLP-output input at the last position.

    ``x_last`` is ``[B, d_ff]``; if ``fn`` returns a tensor it replaces it.
    """

    def make_hook(layer: int):
        def hook(module, args):
            x = args[0]  # [B, T, d_ff]
            new = fn(layer, x[:, -1, :])
            if new is None:
                return None
            x = torch.cat([x[:, :-1, :], new.unsqueeze(1).to(x.dtype)], dim=1)
            return (x, *args[1:])

        return hook

    handles = [m.register_forward_pre_hook(make_hook(i)) for i, m in enumerate(modules)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _forward_last(model, ids, mask, pos) -> torch.Tensor:
    """Logits at the last position only: ``[B, V]``."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1, use_cache=False)
    return out.logits[:, -1, :]


def _capture(model, modules, ids, mask, pos, batch_rows: int) -> torch.Tensor:
    """Clean last-position activations of every layer: ``[N, L, d_ff]``."""
    parts = []
    for s in range(0, ids.shape[0], batch_rows):
        got: dict[int, torch.Tensor] = {}

        def keep(layer, x, got=got):
            got[layer] = x.detach().float()
            return None

        with torch.no_grad(), last_position_patch(modules, keep):
            _forward_last(model, ids[s:s + batch_rows], mask[s:s + batch_rows], pos[s:s + batch_rows])
        parts.append(torch.stack([got[l] for l in range(len(modules))], dim=1))
    return torch.cat(parts)


def _eos_baseline(
    model, modules, rows: list[list[int]], eos_id: int, pad_id: int, skip_first: bool, batch_rows: int, device
):
    """Mean activation over copies of each row with one token replaced by EOS: ``[N, L, d_ff]``."""
    variants, owner = [], []
    for r, row in enumerate(rows):
        for j in range(1 if skip_first else 0, len(row)):
            v = list(row)
            v[j] = eos_id
            variants.append(v)
            owner.append(r)
    ids, mask, pos = (t.to(device) for t in left_pad(variants, pad_id))
    acts = _capture(model, modules, ids, mask, pos, batch_rows)  # [sum n, L, F]
    owner_t = torch.tensor(owner, device=acts.device)
    total = torch.zeros((len(rows), *acts.shape[1:]), device=acts.device).index_add_(0, owner_t, acts)
    counts = torch.bincount(owner_t, minlength=len(rows)).clamp(min=1).float()
    return total / counts[:, None, None]


def rows_per_pass(model, arch: ArchSpec, width: int, cfg: AttributionConfig) -> int:
    """Rows one forward/backward pass may hold under ``cfg.memory_budget_mb``.

    A rough upper estimate of one row's memory, from the model's shapes:
    float32 logits, softmax and logit gradient (``3 V``), per layer the
    activations autograd keeps (about ``10 d_model + 6 d_ff``, the count of
    saved tensors in a gated MLP block with attention), and the row's copy of
    its prompt's cached keys and values (``2 T d_model`` per layer, an upper
    bound: grouped-query attention stores less). ``width`` is the padded row
    length ``T``; without the prefix cache every position is saved, not one.
    """
    if cfg.batch_rows is not None:
        return cfg.batch_rows
    modules = mlp_out_modules(model, arch)
    d_ff = num_neurons(modules[0])
    d_model = weight_shape(modules[0])[1 - neuron_dim(modules[0])]
    vocab = weight_shape(model.get_output_embeddings())[0]
    elem = next(model.parameters()).element_size()
    positions = 1 if cfg.prefix_cache else width
    per_layer = positions * (10 * d_model + 6 * d_ff) * elem + 2 * d_ff * 4  # + the float32 IG leaf and its gradient
    if cfg.prefix_cache:
        per_layer += 2 * width * d_model * elem
    row = 3 * vocab * 4 + len(modules) * per_layer
    return max(1, int(cfg.memory_budget_mb * 2**20 // row))


@dataclass
class _Rows:
    """One call's rows on the model's device: left-padded ``ids``, ``mask``, ``pos`` ``[N, T]`` and targets ``[N]``."""

    model: torch.nn.Module
    arch: ArchSpec
    modules: list[torch.nn.Module]
    rows: list[list[int]]
    ids: torch.Tensor
    mask: torch.Tensor
    pos: torch.Tensor
    targets: torch.Tensor | None
    pad_id: int
    eos_id: int | None
    skip_first: bool

    @property
    def device(self) -> torch.device:
        return self.ids.device


def attribute_rows(
    model,
    arch: ArchSpec,
    rows: list[list[int]],
    targets: list[int] | None,
    cfg: AttributionConfig,
    *,
    pad_id: int,
    eos_id: int | None = None,
    skip_first: bool = True,
) -> torch.Tensor:
    """Scores ``[N, L, d_ff]`` of P(targets[n] | rows[n]) for every neuron.

    ``targets`` may be ``None`` for ``method: activation``. Leaves the model
    untouched: gradients are taken with ``autograd.grad`` with respect to
    patched activations only, never accumulated in ``.grad``.
    """
    if not rows:
        raise ValueError("attribute_rows needs at least one row")
    if cfg.needs_answer and (targets is None or len(targets) != len(rows)):
        raise ValueError(f"method {cfg.method!r} needs one target token per row")
    device = next(model.parameters()).device
    ids, mask, pos = (t.to(device) for t in left_pad(rows, pad_id))
    tgt = torch.tensor(targets, device=device) if cfg.needs_answer else None
    batch = _Rows(model, arch, mlp_out_modules(model, arch), rows, ids, mask, pos, tgt, pad_id, eos_id, skip_first)
    return ATTRIBUTIONS[cfg.method].batched(batch, cfg)


def _activation(batch: _Rows, cfg: AttributionConfig) -> torch.Tensor:
    """``|a|`` at the last prompt position: ``[N, L, d_ff]``."""
    per_pass = rows_per_pass(batch.model, batch.arch, batch.ids.shape[1], cfg)
    return _capture(batch.model, batch.modules, batch.ids, batch.mask, batch.pos, per_pass).abs()


def _grad_x_act_rows(batch: _Rows, cfg: AttributionConfig) -> torch.Tensor:
    """Activation x gradient; full rows with gradients: every position is kept (no prefix cache)."""
    per_pass = rows_per_pass(batch.model, batch.arch, batch.ids.shape[1], replace(cfg, prefix_cache=False))
    return _grad_x_act(batch.model, batch.modules, batch.ids, batch.mask, batch.pos, batch.targets, per_pass)


def _integrated_gradients(batch: _Rows, cfg: AttributionConfig) -> torch.Tensor:
    """``(a - b) x`` the weighted mean gradient along the path from ``b`` to ``a``: ``[N, L, d_ff]``."""
    model, modules, device = batch.model, batch.modules, batch.device
    per_pass = rows_per_pass(model, batch.arch, batch.ids.shape[1], cfg)
    runner = (_CachedRunner if cfg.prefix_cache else _FullRunner)(model, batch.ids, batch.mask, batch.pos)
    a = runner.capture(modules, per_pass)  # [N, L, F]
    if cfg.baseline == "eos":
        if batch.eos_id is None:
            raise ValueError("baseline 'eos' needs the tokenizer's eos_token_id")
        b = _eos_baseline(model, modules, batch.rows, batch.eos_id, batch.pad_id, batch.skip_first, per_pass, device)
    else:
        b = torch.zeros_like(a)
    row_in, row_alpha, row_w, row_layers, plain = _path_rows(len(batch.rows), len(modules), cfg, device)
    grad_sum = torch.zeros_like(a)  # [N, L, F]
    for s in range(0, row_in.shape[0], per_pass):
        ri, al, lm = row_in[s:s + per_pass], row_alpha[s:s + per_pass], row_layers[s:s + per_pass]
        rw = row_w[s:s + per_pass, None]  # [R, 1]
        used = [l for l in range(len(modules)) if bool(lm[:, l].any())]
        leaves = {
            l: (b[ri, l] + al[:, None] * (a[ri, l] - b[ri, l])).requires_grad_(True)  # [R, F]
            for l in used
        }

        def patch(layer, x_last, leaves=leaves, lm=lm):
            if layer not in leaves:
                return None
            return torch.where(lm[:, layer, None], leaves[layer].to(x_last.dtype), x_last)

        with torch.enable_grad(), last_position_patch(modules, patch):
            logits = runner.forward_last(ri)  # [R, V]
            prob = torch.softmax(logits.float(), dim=-1).gather(-1, batch.targets[ri, None]).squeeze(-1)  # [R]
            grads = torch.autograd.grad(prob.sum(), [leaves[l] for l in used])
        for l, g in zip(used, grads):
            g = g.float() * lm[:, l, None]  # [R, F]
            grad_sum[:, l].index_add_(0, ri, g if plain else g * rw)
    return (a - b) * grad_sum / cfg.steps


def _path_rows(n: int, n_layers: int, cfg: AttributionConfig, device):
    """One row per (input, [layer,] point): its input ``[R]``, the point alpha_k ``[R]``, its weight w_k ``[R]``,
    the layers it scales ``[R, L]``, and whether every weight is 1 (the gradients are then summed as they come)."""
    nodes, weights = quadrature_points(cfg.quadrature, cfg.steps)
    alphas = torch.tensor(nodes, dtype=torch.float64).to(device=device, dtype=torch.float32)  # [S]
    plain = all(w == 1.0 for w in weights)
    point_w = torch.tensor(weights, dtype=torch.float32, device=device)  # [S]
    if cfg.ig_path == "all_layers":
        row_in = torch.arange(n, device=device).repeat_interleave(cfg.steps)  # [N*S]
        row_alpha, row_w = alphas.repeat(n), point_w.repeat(n)
        row_layers = torch.ones((n * cfg.steps, n_layers), dtype=torch.bool, device=device)
    else:
        row_in = torch.arange(n, device=device).repeat_interleave(n_layers * cfg.steps)  # [N*L*S]
        layer_of = torch.arange(n_layers, device=device).repeat_interleave(cfg.steps).repeat(n)
        row_alpha, row_w = alphas.repeat(n * n_layers), point_w.repeat(n * n_layers)
        row_layers = torch.nn.functional.one_hot(layer_of, n_layers).bool()
    return row_in, row_alpha, row_w, row_layers, plain


def attribute_rows_loop(
    model,
    arch: ArchSpec,
    rows: list[list[int]],
    targets: list[int] | None,
    cfg: AttributionConfig,
    *,
    eos_id: int | None = None,
    skip_first: bool = True,
) -> torch.Tensor:
    """The same scores as :func:`attribute_rows`, the plain way: ``[N, L, d_ff]``.

    One unpadded row at a time, one full forward (and backward) pass per
    integration step and path, no prefix cache and no batching. Slow; it is
    the reference the batched path is checked and timed against.
    """
    modules = mlp_out_modules(model, arch)
    device = next(model.parameters()).device
    score = ATTRIBUTIONS[cfg.method].loop
    out = []
    for n, row in enumerate(rows):
        one = _Row(model, modules, row, torch.tensor([row], device=device), targets[n] if cfg.needs_answer else None,
                   eos_id, skip_first)
        out.append(score(one, _clean_last(model, modules, one.ids), cfg))  # activations [L, F] -> scores [L, F]
    return torch.stack(out)


@dataclass
class _Row:
    """One unpadded row of :func:`attribute_rows_loop`: ``ids`` ``[1, T]``."""

    model: torch.nn.Module
    modules: list[torch.nn.Module]
    row: list[int]
    ids: torch.Tensor
    target: int | None
    eos_id: int | None
    skip_first: bool


def _activation_loop(one: _Row, a: torch.Tensor, cfg: AttributionConfig) -> torch.Tensor:
    return a.abs()


def _grad_x_act_loop(one: _Row, a: torch.Tensor, cfg: AttributionConfig) -> torch.Tensor:
    return a * _path_grads(one.model, one.modules, one.ids, one.target, {l: a[l] for l in range(len(one.modules))})


def _integrated_gradients_loop(one: _Row, a: torch.Tensor, cfg: AttributionConfig) -> torch.Tensor:
    n_layers = len(one.modules)
    b = torch.zeros_like(a)
    if cfg.baseline == "eos":
        if one.eos_id is None:
            raise ValueError("baseline 'eos' needs the tokenizer's eos_token_id")
        variants = []
        for j in range(1 if one.skip_first else 0, len(one.row)):
            v = list(one.row)
            v[j] = one.eos_id
            variants.append(_clean_last(one.model, one.modules, torch.tensor([v], device=one.ids.device)))
        b = torch.stack(variants).mean(0)
    paths = [list(range(n_layers))] if cfg.ig_path == "all_layers" else [[l] for l in range(n_layers)]
    nodes, weights = quadrature_points(cfg.quadrature, cfg.steps)
    grad_sum = torch.zeros_like(a)  # [L, F]
    for layers in paths:
        for alpha, w in zip(nodes, weights):
            point = {l: b[l] + alpha * (a[l] - b[l]) for l in layers}
            g = _path_grads(one.model, one.modules, one.ids, one.target, point)  # [L, F]
            grad_sum += g if w == 1.0 else w * g
    return (a - b) * grad_sum / cfg.steps


def _clean_last(model, modules, ids: torch.Tensor) -> torch.Tensor:
    """Last-position activations of one unpadded row: ``[L, d_ff]``."""
    got: dict[int, torch.Tensor] = {}
    with torch.no_grad(), last_position_patch(modules, lambda l, x: got.__setitem__(l, x[0].detach().float())):
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return torch.stack([got[l] for l in range(len(modules))])


def _path_grads(model, modules, ids: torch.Tensor, target: int, point: dict[int, torch.Tensor]) -> torch.Tensor:
    """Gradient of P(target) w.r.t. the last-position activations set to ``point``
    (layer -> ``[d_ff]``); zeros for the layers not in ``point``: ``[L, d_ff]``."""
    leaves = {l: v.detach().clone().requires_grad_(True) for l, v in point.items()}

    def patch(layer, x_last):
        return leaves[layer][None].to(x_last.dtype) if layer in leaves else None

    with torch.enable_grad(), last_position_patch(modules, patch):
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1]  # [V]
        prob = torch.softmax(logits.float(), dim=-1)[target]
        grads = dict(zip(leaves, torch.autograd.grad(prob, list(leaves.values()))))
    width = next(iter(point.values())).shape[-1]
    return torch.stack(
        [grads[l].float() if l in grads else torch.zeros(width, device=ids.device) for l in range(len(modules))]
    )


class _FullRunner:
    """Runs selected rows in full."""

    def __init__(self, model, ids, mask, pos):
        self.model, self.ids, self.mask, self.pos = model, ids, mask, pos

    def forward_last(self, rows: torch.Tensor) -> torch.Tensor:
        return _forward_last(self.model, self.ids[rows], self.mask[rows], self.pos[rows])  # [R, V]

    def capture(self, modules, batch_rows: int) -> torch.Tensor:
        return _capture(self.model, modules, self.ids, self.mask, self.pos, batch_rows)


class _CachedRunner(_FullRunner):
    """Runs the shared prefixes once; rows then run their last token on a copy of the cache."""

    def __init__(self, model, ids, mask, pos):
        super().__init__(model, ids, mask, pos)
        with torch.no_grad():
            out = model(
                input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1],
                use_cache=True, logits_to_keep=1,
            )
        self.cache = out.past_key_values  # keys/values of the first T-1 tokens, [N, ...]

    def forward_last(self, rows: torch.Tensor) -> torch.Tensor:
        cache = copy.deepcopy(self.cache)
        cache.reorder_cache(rows)  # [R, ...]: one copy of its prompt's prefix per row
        out = self.model(
            input_ids=self.ids[rows, -1:], attention_mask=self.mask[rows], position_ids=self.pos[rows, -1:],
            past_key_values=cache, use_cache=True, logits_to_keep=1,
        )
        return out.logits[:, -1, :]

    def capture(self, modules, batch_rows: int) -> torch.Tensor:
        parts = []
        for s in range(0, self.ids.shape[0], batch_rows):
            got: dict[int, torch.Tensor] = {}

            def keep(layer, x, got=got):
                got[layer] = x.detach().float()
                return None

            rows = torch.arange(s, min(s + batch_rows, self.ids.shape[0]), device=self.ids.device)
            with torch.no_grad(), last_position_patch(modules, keep):
                self.forward_last(rows)
            parts.append(torch.stack([got[l] for l in range(len(modules))], dim=1))
        return torch.cat(parts)


def _grad_x_act(model, modules, ids, mask, pos, tgt, batch_rows: int) -> torch.Tensor:
    parts = []
    for s in range(0, ids.shape[0], batch_rows):
        sl = slice(s, s + batch_rows)
        leaves: dict[int, torch.Tensor] = {}

        def as_leaf(layer, x_last, leaves=leaves):
            leaves[layer] = x_last.detach().float().requires_grad_(True)
            return leaves[layer]

        with torch.enable_grad(), last_position_patch(modules, as_leaf):
            logits = _forward_last(model, ids[sl], mask[sl], pos[sl])
            prob = torch.softmax(logits.float(), dim=-1).gather(-1, tgt[sl, None]).squeeze(-1)
            order = list(range(len(modules)))
            grads = torch.autograd.grad(prob.sum(), [leaves[l] for l in order])
        parts.append(torch.stack([leaves[l].detach() * g for l, g in zip(order, grads)], dim=1))
    return torch.cat(parts)


@dataclass(frozen=True)
class Attribution:
    """One way of scoring neurons: the batched computation, the plain reference, and whether it needs the answer."""

    batched: Callable[[_Rows, AttributionConfig], torch.Tensor]
    """Every row of a call at once: ``[N, L, d_ff]``."""
    loop: Callable[[_Row, torch.Tensor, AttributionConfig], torch.Tensor]
    """One row from its clean last-position activations ``[L, d_ff]``: its scores ``[L, d_ff]``."""
    needs_answer: bool = True
    """Whether the scores depend on the answer token."""


ATTRIBUTIONS: dict[str, Attribution] = {
    "integrated_gradients": Attribution(_integrated_gradients, _integrated_gradients_loop),
    "grad_x_act": Attribution(_grad_x_act_rows, _grad_x_act_loop),
    "activation": Attribution(_activation, _activation_loop, needs_answer=False),  # LAFN's magnitude analysis
}
"""``attribution.method`` -> how it scores (a new method is one entry here)."""
