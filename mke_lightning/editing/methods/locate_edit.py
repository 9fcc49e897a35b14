"""The locate-then-edit family (ROME, MEMIT, AlphaEdit): what the three share.

An MLP output projection ``W [d_model, d_ff]`` maps a *key* ``k [d_ff]`` (its
input, the neuron activations) to a value ``W k``. These methods rewrite ``W``
so that the key of the edit's subject maps to a new value, and solve for the
change in closed form:

1. **Key** ``k*``: the projection's input at the *last token of the subject*,
   averaged over the bare edit prompt and the same prompt behind a few short
   generated prefixes (so the key is the subject's, not one sentence's).
2. **Target value** ``v*``: a vector ``δ`` is added to the projection's output
   at the subject's last token (in every prompt row) and optimised with Adam so
   that the model says the new target: NLL of the new target + ``kl_factor`` x
   KL(pre-edit || now) of the next-token distribution at the subject's last
   token of the subject alone (what the model thinks the subject *is* should not
   move) + weight decay on ``δ`` relative to the output's own norm; ``δ`` is
   clamped to ``clamp_norm_factor`` x that norm. ``v* = W k* + δ``.
3. **Solve** (each method's module): a change ``ΔW`` with ``ΔW k* ≈ v* - W k*``
   that moves the projection's output on other keys as little as its rule asks
   (ROME: exactly, least change in the metric of the key second moment ``C``;
   MEMIT: least squares weighted by ``λ C``; AlphaEdit: inside the null space of
   ``C``'s high-energy directions and of earlier edits' keys).

Several layers (MEMIT, AlphaEdit): one ``δ`` per edit layer, added to that
layer's own projection output and optimised together, so that each layer's
target is a value that layer can produce. (The papers optimise one vector in
the residual stream after the last edit layer and split it over the layers,
which assumes each MLP's output is added to the residual stream unchanged; the
Gemma 2/3 families normalise it first, so that split does not hold there.) The
layers are then solved in ascending order, each with its keys measured on the
model that already holds the lower layers' changes, as MEMIT does.

The update of a layer is dense (every neuron's value vector moves): a
:class:`~mke_lightning.editing.neuron_delta.NeuronDelta` with ``idx`` = all ``d_ff``
neurons and values ``ΔWᵀ``. No located neurons are needed. Solves run in float64.
The key second moment ``C = E[k kᵀ]`` over ordinary text comes from
:mod:`mke_lightning.editing.key_statistics` (``solve.stats``), taken once per run on the
unedited model.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from mke_lightning.data.records import EditRecord, join_prompt
from mke_lightning.editing.edit_loop import EditStep, UpdateResult, seeded
from mke_lightning.editing.key_statistics import KeyStatsConfig, key_statistics
from mke_lightning.editing.methods.registry import EditMethod
from mke_lightning.editing.neuron_delta import NeuronDelta
from mke_lightning.modeling.architectures import value_vectors
from mke_lightning.modeling.forward import (
    encode_continuation,
    encode_prompt,
    head_at,
    pack,
    right_pad,
    row_logprobs,
    target_logits,
)
from mke_lightning.modeling.prefix_scoring import _window_allows, prefill

log = logging.getLogger(__name__)

CONTEXT_OPENERS = ("The", "Therefore", "Because", "I", "You", "It", "When", "In", "However", "This")
"""First words of the generated context prefixes (the prefix ``i`` continues opener ``i``)."""


@dataclass
class SolveConfig:
    """Settings of the locate-then-edit methods (``rome``, ``memit``, ``alphaedit``): ``model.solve``."""

    layers: list[int] | None = None
    """Edit layers (ascending). ROME takes exactly one; MEMIT and AlphaEdit one or more. Required by
    those methods (docs/methods.md gives the measured choice for the embedded model)."""
    v_steps: int = 20
    """Adam steps on the target vector(s) ``δ`` at most."""
    v_lr: float = 0.5
    """Adam learning rate of ``δ``, in units of the projection output's RMS at the subject token (so the
    same value suits models whose activations differ in scale)."""
    v_weight_decay: float = 0.05
    """Weight of ``Σ ||δ||² / ||W k*||²`` in the target vector's loss."""
    v_stop_prob: float = 0.9
    """Stop optimising ``δ`` once P(target_new) exceeds this on every training row."""
    kl_factor: float = 0.0625
    """Weight of KL(pre-edit || now) of the next-token distribution at the subject's last token of the
    subject alone (the "essence" term)."""
    clamp_norm_factor: float = 4.0
    """``||δ||`` is clamped to at most this x ``||W k*||`` after every step."""
    contexts: int = 2
    """Generated prefixes the edit prompt is also trained and keyed behind (0: the bare prompt only)."""
    context_length: int = 5
    """Tokens sampled after each prefix's opener word."""
    context_seed: int = 0
    """Seed of the prefixes' sampling (the same prefixes for every edit of a run)."""
    cached_prefix: bool = True
    """Send the tokens before the subject through the model once per edit and keep their KV cache (they
    do not depend on ``δ``); each step then runs only the subject's last token and what follows. Speed
    only (the logits are the same up to rounding); off, or where a sliding window would cut the rows,
    every step runs the whole rows."""
    """Seed of the prefixes' sampling (the same prefixes for every edit of a run)."""
    keys: Literal["rows", "mean"] = "rows"
    """Which keys the closed form fits: ``rows``, each training row's own key at the subject (the bare
    prompt's and each context's, all mapped to the unit's target); ``mean``, one key per unit averaged
    over its rows (the papers' reading). On the embedded model a subject's keys behind different
    contexts differ enough that a fit of their mean leaves the bare prompt's P(target_new) near 0
    (docs/methods.md)."""
    keep_other_positions: float = 1.0
    """Weight of the training rows' other positions in the fit: every token of the edit prompts (and their
    targets) but the subject's last one keeps its output, ``ΔW k ≈ 0``, as ``δ`` was optimised with them
    unchanged. A subject's earlier tokens have keys close to its last one's, so without this the solved
    update moves them too and undoes the edit on the embedded model (docs/methods.md). 0: off, the papers'
    reading."""
    neurons: int | None = None
    """Neuron-masked solve: per layer, only the ``neurons`` value vectors that carry most of the full
    solution (largest column norms of its ``ΔW``) change, solved again on them alone with ``C``
    restricted to them (null: every neuron of the layer, the papers' dense update)."""
    mom2_weight: float = 1.0
    """MEMIT's ``λ``: weight of the key second moment ``C`` (a per-key average) against the edit keys'
    ``K Kᵀ`` in ``ΔW (λ C + K Kᵀ) = R Kᵀ``. Larger: smaller, more conservative updates."""
    ridge: float = 1e-4
    """Added to ``C`` as ``ridge x mean eigenvalue x I`` before it is inverted (ROME, MEMIT): a second
    moment from a few thousand keys is near singular in its weakest directions."""
    null_threshold: float = 1e-2
    """AlphaEdit: which of ``C``'s eigen-directions count as unused by ordinary text (see ``null_mode``)."""
    null_mode: Literal["absolute", "energy"] = "energy"
    """``absolute``: eigenvalues below ``null_threshold``; ``energy``: the weakest directions holding at
    most ``null_threshold`` of the trace (never empty) (:func:`~mke_lightning.editing.key_statistics.null_space_projector`)."""
    l2: float = 1.0
    """AlphaEdit's ``L2``: the identity's weight in ``P (Kp Kpᵀ + K Kᵀ) + L2 I``, in units of the mean
    eigenvalue of ``C`` (so the same value suits any key scale)."""
    earlier_weight: float = 1.0
    """AlphaEdit under ``sequential``: weight of the earlier edits' keys ``Kp Kpᵀ`` (the paper's: 1)."""
    stats: KeyStatsConfig = field(default_factory=KeyStatsConfig)
    """Which text the key statistics ``C`` are taken over, and their cache."""

    def __post_init__(self) -> None:
        if self.layers is not None:
            if not self.layers or any(l < 0 for l in self.layers) or sorted(set(self.layers)) != list(self.layers):
                raise ValueError(f"solve.layers must be distinct layer indices >= 0 in ascending order, got {self.layers}")
        if self.v_steps < 0 or self.contexts < 0 or self.context_length < 1:
            raise ValueError("solve.v_steps >= 0, solve.contexts >= 0 and solve.context_length >= 1 are required")
        if self.contexts > len(CONTEXT_OPENERS):
            raise ValueError(f"solve.contexts is at most {len(CONTEXT_OPENERS)}")
        if not self.v_lr > 0 or self.v_weight_decay < 0 or self.kl_factor < 0 or not self.clamp_norm_factor > 0:
            raise ValueError("solve: v_lr > 0, v_weight_decay >= 0, kl_factor >= 0 and clamp_norm_factor > 0 are required")
        if self.neurons is not None and self.neurons < 1:
            raise ValueError(f"solve.neurons must be >= 1 or null, got {self.neurons}")
        if not 0 < self.v_stop_prob <= 1:
            raise ValueError("solve.v_stop_prob must be in (0, 1]")
        if not self.mom2_weight > 0 or self.ridge < 0 or not self.l2 > 0 or self.earlier_weight < 0:
            raise ValueError("solve: mom2_weight > 0, ridge >= 0, l2 > 0 and earlier_weight >= 0 are required")
        if self.null_mode not in ("absolute", "energy") or self.null_threshold < 0:
            raise ValueError(f"solve.null_mode must be 'absolute' or 'energy' and null_threshold >= 0, got {self.null_mode!r}")
        if isinstance(self.stats, dict):  # plain Python use: a nested dict
            self.stats = KeyStatsConfig(**self.stats)


# --------------------------------------------------------------------------- rows


@dataclass
class _Unit:
    """One key-value pair to write: a record in one training language."""

    record: int  # index into the records
    rows: list[int]  # its NLL rows (bare prompt first, then each context)
    kl_row: int  # its essence row (the subject alone)


def subject_end(tokenizer, text: str, start: int, subject: str | None) -> int:
    """Index in ``encode_prompt(text)`` of the last token of ``subject``'s first occurrence at or after
    character ``start``; the last token when the subject is not in the text."""
    ids = encode_prompt(tokenizer, text)
    at = text.find(subject, start) if subject else -1
    if at < 0:
        return len(ids) - 1
    end = at + len(subject)  # one past the subject's last character
    try:
        offsets = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):  # a slow tokenizer: count the prefix's tokens
        return min(len(encode_prompt(tokenizer, text[:end])), len(ids)) - 1
    last = None
    for i, (a, b) in enumerate(offsets):
        if b > a and a < end:  # a real token starting inside the subject or before it
            last = i
    return len(ids) - 1 if last is None else last


class EditRows:
    """The token rows of an edit's target-vector optimisation and where its subject ends in each."""

    def __init__(self, tokenizer, records: list[EditRecord], languages: list[str], edit_language: str,
                 contexts: list[str]) -> None:
        self.prompts: list[list[int]] = []  # [R] prompt ids (BOS first)
        self.targets: list[list[int]] = []  # [R] target ids (an essence row: one unused token)
        self.subject_pos: list[int] = []  # [R] index of the subject's last token in the prompt ids
        self.row_unit: list[int] = []  # [R] the unit each row belongs to
        self.units: list[_Unit] = []
        self.nll_rows: list[int] = []
        self.kl_rows: list[int] = []
        for k, record in enumerate(records):
            for lang in languages:
                if lang not in record.languages and lang != edit_language:
                    continue
                facts = record.facts(lang)
                prompt, new = join_prompt(facts.prompt, facts.target_new, lang)
                target = encode_continuation(tokenizer, new)
                u = len(self.units)
                rows = []
                for ctx in ["", *contexts]:
                    text = f"{ctx}. {prompt}" if ctx else prompt
                    rows.append(self._add(encode_prompt(tokenizer, text), target,
                                          subject_end(tokenizer, text, len(text) - len(prompt), facts.subject), u))
                subject = facts.subject if facts.subject and facts.subject in facts.prompt else None
                essence = subject or prompt  # without a subject in the prompt: the prompt's last token
                kl = self._add(encode_prompt(tokenizer, essence), [0], len(encode_prompt(tokenizer, essence)) - 1, u)
                self.units.append(_Unit(k, rows, kl))
                self.nll_rows += rows
                self.kl_rows.append(kl)

    def _add(self, prompt: list[int], target: list[int], pos: int, unit: int) -> int:
        self.prompts.append(prompt)
        self.targets.append(target)
        self.subject_pos.append(pos)
        self.row_unit.append(unit)
        return len(self.prompts) - 1


# --------------------------------------------------------------------------- hooks


class _Stop(Exception):
    """Raised once the highest layer of interest has run: the rest of the model is not needed."""


class SubjectHooks:
    """Forward hooks on the output projections of ``layers``: read the key at each row's subject token,
    and add ``δ[layer][unit of the row]`` to the output there (when ``deltas`` is set)."""

    def __init__(self, model, arch, layers: list[int], rows: torch.Tensor, pos: torch.Tensor,
                 row_unit: torch.Tensor, stop_after: int | None = None) -> None:
        self.rows, self.pos, self.row_unit = rows, pos, row_unit  # [R] each
        self.keys: dict[int, torch.Tensor] = {}  # layer -> [R, d_ff]
        self.outputs: dict[int, torch.Tensor] = {}  # layer -> [R, d_model] without δ
        self.deltas: dict[int, torch.Tensor] | None = None  # layer -> [U, d_model]
        self.handles = []
        for l in layers:
            module = model.get_submodule(arch.mlp_out_name(l))
            self.handles.append(module.register_forward_hook(self._hook(l, l == stop_after)))

    def _hook(self, layer: int, stop: bool):
        def hook(module, args, out):
            k = args[0]  # [B, T, d_ff]
            self.keys[layer] = k[self.rows, self.pos].detach().float()  # [R, d_ff]
            self.outputs[layer] = out[self.rows, self.pos].detach().float()  # [R, d_model]
            if stop:
                raise _Stop
            if self.deltas is None:
                return None
            add = self.deltas[layer][self.row_unit].to(out.dtype)  # [R, d_model]
            return out.index_put((self.rows, self.pos), out[self.rows, self.pos] + add)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _gathered_logits(model, sel: torch.Tensor, **inputs) -> torch.Tensor:
    """Logits ``[M, V]`` at the positions ``sel [B, T]`` marks (row by row), the LM head run on those only."""
    logits, gathered = head_at(model, sel, lambda: model(**inputs, use_cache=True).logits)
    return logits if gathered else logits[sel]


class PackedRows:
    """Every step sends the whole rows through the model (left-padded, :func:`~mke_lightning.modeling.forward.pack`)."""

    def __init__(self, model, rows: "EditRows", pad: int, device) -> None:
        self.model = model
        self.batch = pack(rows.prompts, rows.targets, pad).to(device)
        width = self.batch.input_ids.shape[1]
        lengths = [len(p) + len(t) - 1 for p, t in zip(rows.prompts, rows.targets)]
        self.hook_rows = torch.arange(len(lengths), device=device)  # [R]
        self.hook_pos = torch.tensor([width - n + p for n, p in zip(lengths, rows.subject_pos)], device=device)  # [R]

    def logits(self) -> list[torch.Tensor]:
        """Each row's logits at its target positions: one ``[len(target), V]`` per row."""
        return list(target_logits(self.model, self.batch).split(self.batch.target_mask.sum(-1).tolist()))


class CachedRows:
    """The tokens before each row's subject token go through the model once (their KV cache kept: ``δ``
    cannot change them); every step sends only the subject token and what follows, on a copy of it."""

    def __init__(self, model, rows: "EditRows", pad: int, device) -> None:
        self.model = model
        self.pre = prefill(model, [p[:s] for p, s in zip(rows.prompts, rows.subject_pos)], pad)
        conts = [p[s:] + t[:-1] for p, s, t in zip(rows.prompts, rows.subject_pos, rows.targets)]
        width = max(len(c) for c in conts)
        ids, mask = right_pad(conts, width, pad)  # [R, W] each
        self.ids, self.mask = ids.to(device), torch.cat([self.pre.mask, mask.to(device)], dim=1)  # [R, T + W]
        self.pos = self.pre.next_pos[:, None] + torch.arange(width, device=device)  # [R, W]
        self.sel = torch.zeros(len(conts), width, dtype=torch.bool)  # [R, W] where a target token is predicted
        for i, (p, s, t) in enumerate(zip(rows.prompts, rows.subject_pos, rows.targets)):
            first = len(p) - 1 - s  # the prompt's last token, in the continuation
            self.sel[i, first:first + len(t)] = True
        self.sel = self.sel.to(device)
        self.counts = self.sel.sum(-1).tolist()
        self.hook_rows = torch.arange(len(conts), device=device)  # [R]
        self.hook_pos = torch.zeros(len(conts), dtype=torch.long, device=device)  # the subject token opens each continuation

    def logits(self) -> list[torch.Tensor]:
        logits = _gathered_logits(self.model, self.sel, input_ids=self.ids, attention_mask=self.mask,
                                  position_ids=self.pos, past_key_values=copy.deepcopy(self.pre.cache))
        return list(logits.split(self.counts))


def row_forward(model, rows: "EditRows", pad: int, device, cached: bool = True):
    """:class:`CachedRows` where it gives the same logits (every row has a token before its subject token
    and no sliding-window layer cuts the rows), else :class:`PackedRows`."""
    longest = max(len(p) + len(t) for p, t in zip(rows.prompts, rows.targets))
    if cached and min(rows.subject_pos) > 0 and _window_allows(model, longest):
        return CachedRows(model, rows, pad, device)
    return PackedRows(model, rows, pad, device)


def _forward_until_stop(model, batch, cleanup) -> None:
    """Run ``batch`` (a packed batch) until a hook raises :class:`_Stop`, then ``cleanup()`` the hooks."""
    try:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
              use_cache=False)
    except _Stop:
        pass
    finally:
        cleanup()


@torch.no_grad()
def subject_keys_now(editor, rows: EditRows, layer: int, per_row: bool) -> torch.Tensor:
    """The keys at ``layer`` on the model with the lower layers' updates on top: ``[N, d_ff]`` per row
    (``keys: rows``) or ``[U, d_ff]`` per unit (``keys: mean``)."""
    ed = editor
    nll = rows.nll_rows
    prompts = [rows.prompts[i] for i in nll]
    batch = pack(prompts, [[0]] * len(prompts), ed.tokenizer.pad_token_id).to(ed.device)
    width = batch.input_ids.shape[1]
    pos = torch.tensor([width - len(p) + rows.subject_pos[i] for p, i in zip(prompts, nll)])
    hooks = SubjectHooks(ed.causal_lm, ed.arch, [layer], torch.arange(len(nll)).to(ed.device), pos.to(ed.device),
                         torch.zeros(len(nll), dtype=torch.long), stop_after=layer)
    _forward_until_stop(ed.causal_lm, batch, hooks.remove)
    k = hooks.keys[layer]  # [N, d_ff]
    if per_row:
        return k
    unit = torch.tensor([rows.row_unit[i] for i in nll], device=k.device)
    n_units = len(rows.units)
    n = torch.bincount(unit, minlength=n_units)[:, None]
    return torch.zeros(n_units, k.shape[1], device=k.device).index_add_(0, unit, k) / n


@torch.no_grad()
def other_keys(editor, rows: EditRows, layer: int) -> torch.Tensor:
    """Keys at ``layer`` of every position of the NLL rows (prompt and target) but the subject's last
    token and the padding, on the model as it is now (lower layers' updates on top): ``[M, d_ff]``."""
    ed = editor
    nll = rows.nll_rows
    batch = pack([rows.prompts[i] for i in nll], [rows.targets[i] for i in nll], ed.tokenizer.pad_token_id).to(ed.device)
    width = batch.input_ids.shape[1]
    keep = batch.attention_mask.bool().clone()  # [N, T]
    for j, i in enumerate(nll):
        row_len = len(rows.prompts[i]) + len(rows.targets[i]) - 1
        start = width - row_len
        keep[j, start] = False  # BOS: its activations are outliers no edit touches
        keep[j, start + rows.subject_pos[i]] = False
    got: dict[str, torch.Tensor] = {}

    def grab(module, args):
        got["k"] = args[0].detach()
        raise _Stop

    handle = ed.causal_lm.get_submodule(ed.arch.mlp_out_name(layer)).register_forward_pre_hook(grab)
    _forward_until_stop(ed.causal_lm, batch, handle.remove)
    return got["k"][keep.to(got["k"].device)].float()  # [M, d_ff]


# --------------------------------------------------------------------------- the method base


class LocateThenEdit(EditMethod):
    """Shared machinery: keys, target vectors, the layer-by-layer solve. Subclasses give :meth:`solve_layer`."""

    single_layer: bool = False

    def __init__(self, editor) -> None:
        super().__init__(editor)
        self._stats = None
        self._contexts: list[str] | None = None

    # -- settings ------------------------------------------------------------
    @property
    def cfg(self) -> SolveConfig:
        return self.editor.solve_config

    def check(self) -> None:
        cfg = self.cfg
        if cfg.layers is None:
            raise ValueError(f"method {self.name} edits chosen layers: set model.solve.layers "
                             "(configs/mzsre/ holds the measured layers of the embedded model)")
        if self.single_layer and len(cfg.layers) != 1:
            raise ValueError(f"method {self.name} edits one layer: model.solve.layers must hold one index, got {cfg.layers}")

    @property
    def needs_masks(self) -> bool:
        return False

    def settings(self) -> dict:
        return {"solve": asdict(self.cfg)}

    # -- what is read off the unedited model, once -----------------------------
    def statistics(self):
        """The key statistics of the edit layers (taken once per run, on the model the run began with)."""
        if self._stats is None:
            ed = self.editor
            fingerprint = getattr(ed, "_base_fingerprint", None)  # the unedited model's, where the editor knows it
            if fingerprint is None and ed.applied:
                log.warning("%s: key statistics taken on a model that already holds %d edits", self.name, len(ed.applied))
            self._stats = key_statistics(ed.causal_lm, ed.tokenizer, ed.arch, self.cfg.stats, layers=self.cfg.layers,
                                         fingerprint=fingerprint)
        return self._stats

    def second_moment(self, layer: int) -> torch.Tensor:
        """``C`` of ``layer`` as float64 on the model's device: ``[d_ff, d_ff]``."""
        return self.statistics().second_moment(layer).to(self.editor.device, torch.float64)

    def regularised(self, layer: int) -> torch.Tensor:
        """``C + ridge x mean eigenvalue x I`` (float64): ``[d_ff, d_ff]``."""
        c = self.second_moment(layer)
        scale = float(torch.diagonal(c).mean())
        return c + self.cfg.ridge * max(scale, 1e-30) * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)

    @torch.no_grad()
    def contexts(self) -> list[str]:
        """The generated prefixes (sampled once per run from fixed openers, seeded)."""
        if self._contexts is None:
            ed, cfg = self.editor, self.cfg
            out = []
            if cfg.contexts:
                tok = ed.tokenizer
                with seeded(cfg.context_seed, ed.device):
                    for opener in CONTEXT_OPENERS[: cfg.contexts]:
                        ids = torch.tensor([encode_prompt(tok, opener)], device=ed.device)
                        gen = ed.causal_lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                    max_new_tokens=cfg.context_length, min_new_tokens=cfg.context_length,
                                                    do_sample=True, top_k=5, top_p=None, temperature=None,
                                                    pad_token_id=tok.pad_token_id)
                        text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
                        out.append(" ".join(f"{opener} {text}".replace("{", " ").replace("}", " ").split()))
            self._contexts = out
        return self._contexts

    # -- per-layer pieces -------------------------------------------------------
    def weight(self, layer: int) -> torch.Tensor:
        """The output projection as ``W [d_model, d_ff]`` (float64)."""
        module = self.editor.causal_lm.get_submodule(self.editor.arch.mlp_out_name(layer))
        return value_vectors(getattr(module, "base_layer", module)).detach().T.to(torch.float64)

    def solve_layer(self, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        """``ΔW [d_model, d_ff]`` (float64) for ``keys [d_ff, U]`` that should move by ``resid [d_model, U]``."""
        raise NotImplementedError

    def remember(self, layer: int, keys: torch.Tensor) -> None:
        """Called with each layer's keys ``[d_ff, U]`` once the update is made (AlphaEdit keeps them)."""

    # -- the edit ---------------------------------------------------------------
    def solve_masked(self, layer: int, keys: torch.Tensor, resid: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The change of neurons ``idx [n]`` only: ``[d_model, n]`` for their keys ``[n, U]`` (``solve.neurons``)."""
        raise ValueError(f"method {self.name} has no neuron-masked solve (model.solve.neurons)")

    def neuron_count(self, mask, handle) -> int:
        ed = self.editor
        sizes = [value_vectors(ed.causal_lm.get_submodule(ed.arch.mlp_out_name(l))).shape[0] for l in self.cfg.layers]
        return sum(min(n, self.cfg.neurons or n) for n in sizes)

    def make_update(self, batch: EditStep) -> UpdateResult:
        ed, cfg = self.editor, self.cfg
        mine = batch.records
        every = [r for part in batch.ranks.gather(mine) for r in part]  # every rank solves the whole batch alike
        order = {rid: i for i, rid in enumerate(batch.all_ids)}
        records = sorted(every, key=lambda r: order.get(r.id, len(order)))
        counts = [self.neuron_count(None, None)] * len(mine)
        model = ed.causal_lm
        was_training = model.training
        model.eval()
        try:
            self.statistics()
            rows = EditRows(ed.tokenizer, records, ed.train_languages or [ed.edit_language], ed.edit_language, self.contexts())
            deltas, steps, loss = self._target_vectors(rows)
            values, keys_opt = deltas
            if not all(torch.isfinite(v).all() for v in values.values()):
                return UpdateResult(None, steps, loss, [float("nan")] * len(mine), counts, "the target vector holds NaN or inf")
            delta = self._solve(rows, values, keys_opt)
            if delta is None:
                return UpdateResult(None, steps, loss, [float("nan")] * len(mine), counts, "the solved update holds NaN or inf")
            p_rows = self._p_new(rows, delta)
        finally:
            model.train(was_training)
        p_new = []
        for r in mine:  # per record of this rank: the lowest P(target_new) of its bare prompts after the update
            k = next(i for i, rec in enumerate(records) if rec.id == r.id)
            p_new.append(min((p for u, p in zip(rows.units, p_rows) if u.record == k), default=float("nan")))
        return UpdateResult(delta, steps, loss, p_new, counts)

    def _target_vectors(self, rows: EditRows):
        """Optimise ``δ`` per layer and unit; returns ``((v* per layer, keys per layer), steps, loss)``: one
        pair per row (``[N, d_model]``, ``[N, d_ff]``, ``keys: rows``) or per unit (``[U, ...]``, ``keys: mean``).

        Hot path (every step of every edit): the optimisation loop reads top to bottom."""
        ed, cfg = self.editor, self.cfg
        model = ed.causal_lm
        fwd = row_forward(model, rows, ed.tokenizer.pad_token_id, ed.device, cfg.cached_prefix)
        row_unit = torch.tensor(rows.row_unit)
        n_units = len(rows.units)
        hooks = SubjectHooks(model, ed.arch, cfg.layers, fwd.hook_rows, fwd.hook_pos, row_unit.to(ed.device))
        nll_rows = torch.tensor(rows.nll_rows)
        nll_targets = [rows.targets[i] for i in rows.nll_rows]
        try:
            with torch.no_grad():
                split = fwd.logits()  # one [len(target), V] per row; δ not yet set: the pre-edit model
            pre_kl = torch.log_softmax(torch.cat([split[i][-1:] for i in rows.kl_rows]).float(), -1)  # [U, V]
            # ||W k*|| per layer and unit: the scale of δ (its unit, its weight decay, its clamp)
            scale = {}
            for l in cfg.layers:
                out = hooks.outputs[l][nll_rows]  # [N, d_model]
                mean = torch.zeros(n_units, out.shape[1], device=out.device).index_add_(0, row_unit[nll_rows].to(out.device), out)
                mean /= torch.bincount(row_unit[nll_rows], minlength=n_units).to(out.device)[:, None]
                scale[l] = mean.norm(dim=1).clamp(min=1e-6)  # [U]
            d_model = hooks.outputs[cfg.layers[0]].shape[1]
            # δ = θ x RMS(W k*): θ is what Adam moves (learning rate in units of the output's RMS)
            theta = {l: torch.zeros(n_units, d_model, device=ed.device, requires_grad=True) for l in cfg.layers}
            rms = {l: (scale[l] / math.sqrt(d_model))[:, None] for l in cfg.layers}  # [U, 1]
            opt = torch.optim.Adam(list(theta.values()), lr=cfg.v_lr)
            steps, loss_v = 0, float("nan")
            for step in range(cfg.v_steps + 1):
                hooks.deltas = {l: theta[l] * rms[l] for l in cfg.layers}
                split = fwd.logits()
                lp = row_logprobs([split[i] for i in rows.nll_rows], nll_targets)  # [len(target)] per NLL row
                nll = torch.stack([-x.mean() for x in lp]).mean()
                post = torch.log_softmax(torch.cat([split[i][-1:] for i in rows.kl_rows]).float(), -1)  # [U, V]
                kl = (pre_kl.exp() * (pre_kl - post)).sum(-1).mean()
                decay = sum(((hooks.deltas[l].norm(dim=1) / scale[l]) ** 2).sum() for l in cfg.layers)
                loss = nll + cfg.kl_factor * kl + cfg.v_weight_decay * decay
                loss_v = float(loss.detach())
                p_seq = [float(x.detach().sum().exp()) for x in lp]
                if step == cfg.v_steps or min(p_seq) > cfg.v_stop_prob or not math.isfinite(loss_v):
                    break
                steps = step + 1
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():  # ||δ|| <= clamp_norm_factor x ||W k*||
                    for l in cfg.layers:
                        limit = cfg.clamp_norm_factor * scale[l] / rms[l][:, 0]  # [U] in θ units
                        norm = theta[l].norm(dim=1)
                        theta[l].mul_((limit / norm.clamp(min=1e-12)).clamp(max=1.0)[:, None])
            # v* = W k* + δ with k* the unit's mean key over its NLL rows, as they were in the last pass
            values, keys = {}, {}
            for l in cfg.layers:
                k = hooks.keys[l][nll_rows]  # [N, d_ff]
                out = hooks.outputs[l][nll_rows]  # [N, d_model]
                unit = row_unit[nll_rows].to(k.device)
                if cfg.keys == "rows":  # each row's key maps to its own output plus its unit's δ
                    keys[l] = k  # [N, d_ff]
                    values[l] = (out + hooks.deltas[l].detach()[unit]).double()  # [N, d_model]
                    continue
                n = torch.bincount(unit, minlength=n_units).to(k.device)[:, None]
                keys[l] = torch.zeros(n_units, k.shape[1], device=k.device).index_add_(0, unit, k) / n  # [U, d_ff]
                mean_out = torch.zeros(n_units, out.shape[1], device=out.device).index_add_(0, unit, out) / n  # [U, d_model]
                values[l] = (mean_out + hooks.deltas[l].detach()).double()  # [U, d_model]
        finally:
            hooks.remove()
        return (values, keys), steps, loss_v

    @torch.no_grad()
    def _solve(self, rows: EditRows, values: dict, keys_opt: dict) -> NeuronDelta | None:
        """Each layer in ascending order: keys on the model holding the lower layers' updates, then the closed form."""
        ed, cfg = self.editor, self.cfg
        on_top = []
        out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        solved_keys = {}
        try:
            for i, l in enumerate(cfg.layers):
                keys = keys_opt[l] if i == 0 else subject_keys_now(ed, rows, l, cfg.keys == "rows")  # [U, d_ff]
                w = self.weight(l)  # [d_model, d_ff]
                k = keys.T.double()  # [d_ff, U]
                resid = values[l].T - w @ k  # [d_model, U]
                fit_k, fit_r = k, resid
                if cfg.keep_other_positions > 0:  # the rows' other tokens keep their outputs: ΔW k_o ≈ 0
                    other = other_keys(ed, rows, l).T.double() * math.sqrt(cfg.keep_other_positions)  # [d_ff, M]
                    fit_k = torch.cat([k, other], dim=1)
                    fit_r = torch.cat([resid, resid.new_zeros(resid.shape[0], other.shape[1])], dim=1)
                dw = self.solve_layer(l, fit_k, fit_r)  # [d_model, d_ff]
                idx = torch.arange(dw.shape[1], device=dw.device)
                if cfg.neurons is not None and cfg.neurons < dw.shape[1]:  # the neurons carrying most of it, solved alone
                    idx = dw.norm(dim=0).topk(cfg.neurons).indices.sort().values  # [n]
                    dw = self.solve_masked(l, fit_k[idx], fit_r, idx)  # [d_model, n]
                if not torch.isfinite(dw).all():
                    return None
                out[l] = (idx, dw.T.to(torch.float32).contiguous())  # [n], [n, d_model]
                solved_keys[l] = k
                if i + 1 < len(cfg.layers):
                    on_top.append(NeuronDelta({l: out[l]}).apply_on_top(ed.causal_lm, ed.arch))
        finally:
            for h in on_top:
                h()
        for l, k in solved_keys.items():
            self.remember(l, k)
        return NeuronDelta(out)

    @torch.no_grad()
    def _p_new(self, rows: EditRows, delta: NeuronDelta) -> list[float]:
        """P(target_new) of each unit's bare prompt with ``delta`` on top."""
        ed = self.editor
        bare = [u.rows[0] for u in rows.units]
        batch = pack([rows.prompts[i] for i in bare], [rows.targets[i] for i in bare], ed.tokenizer.pad_token_id).to(ed.device)
        undo = delta.apply_on_top(ed.causal_lm, ed.arch)
        try:
            logits = target_logits(ed.causal_lm, batch)
        finally:
            undo()
        lp = row_logprobs(list(logits.split(batch.target_mask.sum(-1).tolist())), [rows.targets[i] for i in bare])
        return [float(x.sum().exp()) for x in lp]
