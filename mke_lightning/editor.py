"""The editing LightningModule: knowledge edits of a causal LM, one method per run.

``model.method`` picks how an edit is parameterised (docs/methods.md):

- ``memla``: LoRA on the MLP output projections, masked to the located neurons
  (language-independent and language-specific adapters; drop a category in
  ``lora.categories`` for the ablations);
- ``lora``: plain LoRA (fixed ``lora.rank``, nothing masked) on the layers of
  the located neurons or on ``lora.layers``;
- ``ft_l``: constrained fine-tuning of the output projection of ``values.layers``
  (every value vector, each entry's change clamped to ``values.max_abs``);
- ``lafn``: the value vectors of the language-agnostic neurons, updated
  directly and trained on every language in ``train_languages`` at once.

Every method optimises the same objective (``loss``) with its own small loop
and yields a :class:`~mke_lightning.neuron_delta.NeuronDelta`, applied merged
or on top. ``protocol`` says what happens next: ``single`` undoes each edit
after the callbacks have evaluated it, ``batch`` trains a batch's edits
together (united masks) and undoes them, ``sequential`` keeps every edit.

On several ranks, ``single`` edits each rank's records on its own copy of the
model. ``batch`` and ``sequential`` share each step's edit across ranks
(:class:`SharedEdit`): each rank holds its share of the step's records, the
masks are gathered and united, every rank starts the same update (seeded by
the records' ids) and back-propagates its share of the loss (the mean over
the whole batch's training units), the gradients are summed through the
strategy, and the stopping rule reads the whole batch's loss. Every rank then
applies the same update, as one process editing the whole batch would.

Callbacks reach the model through a small protocol that any LightningModule
can offer: attributes ``causal_lm`` (a Hugging Face causal LM), ``tokenizer``
and ``arch`` (an :class:`~mke_lightning.architectures.ArchSpec`), and a dict
``neuron_masks`` (record id -> :class:`~mke_lightning.neurons.NeuronMask`).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info

from mke_lightning.background import unrelated_prompts
from mke_lightning.masked_lora import LoRAConfig, apply_delta, attach, whole_layers
from mke_lightning.neuron_delta import NeuronDelta, OnTop, Restore
from mke_lightning.model_loading import ModelConfig, load_causal_lm
from mke_lightning.neurons import CATEGORIES, NeuronMask
from mke_lightning.records import EditRecord, join_prompt
from mke_lightning.scoring import encode_continuation, encode_prompt, grouped_target_logits, kept_logits, pack, pack_groups, row_logprobs
from mke_lightning.value_update import ValueUpdateConfig, attach_values

log = logging.getLogger(__name__)


@dataclass
class EditLossConfig:
    """The edit objective and its stopping rule (defaults: the MEMLA authors')."""

    new_weight: float = 2.5
    """Weight of NLL(target_new | prompt), mean over target tokens."""
    true_weight: float = 2.0
    """Weight of P(target_true | prompt) (sequence probability); skipped where a record has no old target."""
    kl_weight: float = 0.0
    """Weight of KL(pre-edit || edited) of the next-token distribution on unrelated anchor prompts."""
    anchors: str | None = None
    """JSON file ``{lang: [prompt, ...]}`` of anchor prompts for the KL term (default: the packaged set)."""
    anchor_languages: list[str] | None = None
    """Languages of the anchors used (default: the edit language only; each anchor adds a row to every step)."""
    max_steps: int = 60
    """Optimisation steps per edit at most."""
    stop_loss: float = 0.01
    """Stop when the loss falls below this."""
    stop_prob: float = 0.96
    """Stop when P(target_new | prompt) exceeds this."""
    length_groups: int = 3
    """Forward passes per step at most: the step's rows (languages, anchors) grouped by length, each group
    padded only to its own longest row; 1: one padded batch. Speed only, the loss is the same.
    One process only (several ranks keep one pass, so that their passes stay in step)."""

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError("loss.max_steps must be >= 1")
        if self.length_groups < 1:
            raise ValueError("loss.length_groups must be >= 1")


PROTOCOLS = ("single", "batch", "sequential")
METHODS = ("memla", "lora", "ft_l", "lafn")


def unite_masks(masks: list[NeuronMask]) -> NeuronMask:
    """One mask holding every neuron of ``masks``, per category and layer."""
    layers: dict[str, dict[int, set[int]]] = {c: {} for c in CATEGORIES}
    for m in masks:
        for cat, per_layer in m.layers.items():
            for layer, idx in per_layer.items():
                layers.setdefault(cat, {}).setdefault(layer, set()).update(idx)
    return NeuronMask("+".join(m.record_id for m in masks), {c: {l: sorted(v) for l, v in sorted(d.items())} for c, d in layers.items()})


@dataclass
class EditOutcome:
    record_id: str
    steps: int
    loss: float
    p_new: float
    neurons: int
    seconds: float
    failed: str | None = None
    """Why the edit was rolled back (a non-finite loss or update); ``None`` when it was applied."""


class SharedEdit:
    """The ranks that train one edit together, each on its share of the batch's records.

    With one rank (no strategy) every call returns its input. With several, the
    step's records and masks are gathered (``all_gather_object``) and the loss
    terms and gradients summed through the Lightning strategy's ``reduce``, so
    every rank sees the same global loss and ends with the same update.
    """

    def __init__(self, strategy=None) -> None:
        self.strategy = strategy
        self.size = 1 if strategy is None else strategy.world_size
        self.rank = 0 if strategy is None else strategy.global_rank

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        parts: list = [None] * self.size
        dist.all_gather_object(parts, obj)
        return parts

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks (one collective for all of them)."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.strategy.root_device)
        return self.strategy.reduce(t, reduce_op="sum").tolist()

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Replace each parameter's gradient by its sum over the ranks (one flat fp32 buffer, one collective)."""
        if self.size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.strategy.reduce(torch.cat([g.reshape(-1).float() for g in grads]), reduce_op="sum")  # [sum of numel]
        for p, g, part in zip(params, grads, flat.split([g.numel() for g in grads])):
            p.grad = part.view_as(g).to(g.dtype)


@contextmanager
def _seeded(seed: int, device: torch.device):
    """Draw from generators seeded with ``seed`` inside; the global generators' states are untouched outside."""
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(cuda[0]):
                torch.cuda.manual_seed(seed)
        yield


def _settings_of(factory) -> dict | str:
    """What an optimiser factory builds: the class path and its arguments, read off a throw-away optimiser."""
    try:
        opt = factory([torch.nn.Parameter(torch.zeros(1))])
    except Exception:  # a factory that wants more than parameters: say what it is
        inner = factory.func if isinstance(factory, functools.partial) else factory
        return f"{getattr(inner, '__module__', '?')}.{getattr(inner, '__qualname__', type(inner).__qualname__)}"
    cls = type(opt)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": {k: _plain(v) for k, v in opt.defaults.items()}}


def _plain(v):
    """``v`` as JSON can hold it (a one-element tensor as its number, anything else unknown as its repr)."""
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v if v is None or isinstance(v, (bool, int, float, str)) else repr(v)


class KnowledgeEditor(L.LightningModule):
    """Edits facts of a causal LM with LoRA updates masked to located neurons."""

    def __init__(
        self,
        lm: ModelConfig | None = None,
        edit_language: str = "en",
        lora: LoRAConfig | None = None,
        loss: EditLossConfig | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        protocol: str = "single",
        method: str = "memla",
        values: ValueUpdateConfig | None = None,
        train_languages: list[str] | None = None,
        save_deltas: bool = False,
        init_seed: int = 0,
    ) -> None:
        """
        Args:
            lm: which causal LM to load and how.
            edit_language: language of the edit prompt the update is trained on.
            lora: masked-LoRA adapters and merge settings.
            loss: edit objective and stopping rule.
            optimizer: optimiser factory for the adapters of each edit (default Adam, lr 1e-3).
            protocol: ``single`` (one edit per batch, undone after its evaluation),
                ``batch`` (the batch's edits optimised together on their united masks,
                undone after evaluation) or ``sequential`` (each batch's edits stay:
                later edits are made on the edited model). ``batch`` and ``sequential`` on
                several ranks: each step's edit is trained on every rank's batch together.
            method: ``memla``, ``lora``, ``ft_l`` or ``lafn`` (see the module docstring).
            values: the direct value-vector update of ``ft_l`` and ``lafn``.
            train_languages: languages whose edit prompts (each with its own new target)
                the edit is trained on; null: the edit language only.
            save_deltas: write each edit (``single``/``batch``: one file per batch; ``sequential``:
                one file per step, in order) as a delta under ``<log dir>/deltas/``.
            init_seed: seed of each update's random start (LoRA's ``A``, ``values.init_std``), combined
                with the ids of the edit's records: the same start on every rank, in every run and
                after a restart, whatever was drawn before.
        """
        super().__init__()
        self.save_hyperparameters()
        self.lm_config = lm or ModelConfig()
        self.edit_language = edit_language
        self.lora_config = lora or LoRAConfig()
        self.loss_config = loss or EditLossConfig()
        self.optimizer_factory = optimizer
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        self.protocol = protocol
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method = method
        self.values_config = values or ValueUpdateConfig()
        if method == "ft_l" and self.values_config.layers is None:
            raise ValueError("method ft_l fine-tunes whole output projections: set values.layers (e.g. [12])")
        if method == "lafn" and self.values_config.layers is not None:
            raise ValueError("method lafn updates the located neurons: leave values.layers null (ft_l takes whole layers)")
        if train_languages is not None and not train_languages:
            raise ValueError("train_languages is empty; use null for the edit language only")
        self.train_languages = train_languages
        self.save_deltas = save_deltas
        self.init_seed = init_seed
        self.applied: list[tuple[list[str], NeuronDelta]] = []  # sequential: the edits kept in the model, in order
        self.automatic_optimization = False
        self.causal_lm = None
        self.tokenizer = None
        self.arch = None
        self.neuron_masks: dict[str, NeuronMask] = {}
        self.outcomes: list[EditOutcome] = []
        self.resumed: list[EditOutcome] = []  # edits done (on any rank) before a restart from a checkpoint
        self._restore: Restore | OnTop | None = None
        self._delta_dir: Path | None = None
        self._anchor_logp: torch.Tensor | None = None  # [A, V] pre-edit log-probs at the anchors' last position
        self._anchor_ids: list[list[int]] = []

    # -- model ------------------------------------------------------------
    def configure_model(self) -> None:
        if self.causal_lm is not None:
            return
        strategy = self.trainer.strategy if self._trainer is not None else None
        if getattr(strategy, "zero_stage_3", False):
            # transformers loads (or initialises) partitioned weights correctly only
            # while a DeepSpeed config object is alive.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_deepspeed = HfDeepSpeedConfig(strategy.config)
        self.causal_lm, self.tokenizer, self.arch = load_causal_lm(self.lm_config, device=self._build_device())

    def _build_device(self) -> torch.device | None:
        """Where to build the weights: the strategy's device, unless the strategy shards them as they are built."""
        if self._trainer is None:
            return None
        strategy = self.trainer.strategy
        if getattr(strategy, "zero_stage_3", False):
            return None  # deepspeed.zero.Init places and partitions each parameter itself
        return strategy.root_device

    def configure_optimizers(self):
        return None  # each edit builds its own optimiser over its own adapters

    def state_dict(self, *args, **kwargs):
        # The base model is not trained; checkpoints of the single protocol hold nothing of it.
        return {}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return torch.nn.modules.module._IncompatibleKeys([], [])

    # -- what this run is ----------------------------------------------------
    @property
    def method_name(self) -> str:
        """The method, with the MEMLA ablations named by the category switched off."""
        if self.method == "memla":
            off = [c for c in CATEGORIES if c not in self.lora_config.categories]
            return "memla" + "".join(f"-no_{c}" for c in off)
        return self.method

    @property
    def needs_masks(self) -> bool:
        """Whether each record needs located neurons (the NeuronLocalization callback)."""
        if self.method == "lora":
            return self.lora_config.layers is None
        if self.method == "ft_l":
            return False
        return True

    def run_info(self) -> dict:
        """Method, protocol and settings, for the run's ``results.json``."""
        def plain(x):
            return asdict(x) if hasattr(x, "__dataclass_fields__") else x

        opt = self.hparams.get("optimizer")  # LightningCLI: the class path and init args as given
        if not isinstance(opt, (dict, str)):
            opt = _settings_of(self.optimizer_factory)
        return {
            "method": self.method_name,
            "protocol": self.protocol,
            "train_languages": self.train_languages or [self.edit_language],
            "settings": {
                "lora": plain(self.lora_config) if self.method in ("memla", "lora") else None,
                "values": plain(self.values_config) if self.method in ("ft_l", "lafn") else None,
                "loss": plain(self.loss_config),
                "optimizer": opt,
                "dtype": self.lm_config.dtype,
                "load_in_8bit": self.lm_config.load_in_8bit,
            },
        }

    # -- anchors for the KL locality term -------------------------------------
    def _anchors(self) -> list[str]:
        data = unrelated_prompts(self.loss_config.anchors)
        langs = self.loss_config.anchor_languages or [self.edit_language]
        return [p for lang in langs for p in data.get(lang, [])]

    @torch.no_grad()
    def _prepare_anchors(self) -> None:
        if self.loss_config.kl_weight <= 0 or self._anchor_logp is not None:
            return
        self._anchor_ids = [encode_prompt(self.tokenizer, p) for p in self._anchors()]
        batch = pack(self._anchor_ids, [[0]] * len(self._anchor_ids), self.tokenizer.pad_token_id).to(self.device)
        self._anchor_logp = torch.log_softmax(kept_logits(self.causal_lm, batch)[:, -1].float(), -1)

    def anchor_kl(self, logits: torch.Tensor) -> torch.Tensor:
        """KL(pre-edit || now) of the next-token distribution, mean over the anchors: ``logits`` ``[A, V]`` at their last positions."""
        post = torch.log_softmax(logits.float(), -1)  # [A, V]
        return (self._anchor_logp.exp() * (self._anchor_logp - post)).sum(-1).mean()

    # -- edits ------------------------------------------------------------
    def edit(self, record: EditRecord, mask: NeuronMask) -> EditOutcome:
        """Train and apply one edit; the undo is kept for :meth:`restore`."""
        return self.edit_many([record], [mask])[0]

    def _rows(self, records: list[EditRecord]) -> tuple[list[list[int]], list[list[int]], list[tuple[int, int, int | None]]]:
        """Prompt and target token rows, and the training units ``(record index, new-target row, old-target row)``:
        one unit per record and training language the record has."""
        cfg = self.loss_config
        prompts, targets, units = [], [], []
        for k, record in enumerate(records):
            for lang in self.train_languages or [self.edit_language]:
                if lang not in record.languages and lang != self.edit_language:
                    continue  # a record without this training language trains on the others
                facts = record.facts(lang)
                prompt, new = join_prompt(facts.prompt, facts.target_new, lang)
                p_ids = encode_prompt(self.tokenizer, prompt)
                new_row, true_row = len(targets), None
                prompts.append(p_ids)
                targets.append(encode_continuation(self.tokenizer, new))
                if facts.target_true and cfg.true_weight:
                    true_row = len(targets)
                    prompts.append(p_ids)
                    targets.append(encode_continuation(self.tokenizer, join_prompt(facts.prompt, facts.target_true, lang)[1]))
                units.append((k, new_row, true_row))
        return prompts, targets, units

    def _attach(self, mask: NeuronMask | None):
        """The trainable update of this run's method, hooked into the model (``None``: nothing to train)."""
        if self.method == "memla":
            return attach(self.causal_lm, self.arch, mask, self.lora_config)
        if self.method == "lora":
            layers = self.lora_config.layers or sorted(mask.union())
            if not layers:
                return None
            return attach(self.causal_lm, self.arch, whole_layers(self.causal_lm, self.arch, layers, mask.record_id if mask else ""),
                          replace(self.lora_config, categories=[CATEGORIES[0]]))
        return attach_values(self.causal_lm, self.arch, mask, self.values_config)

    def edit_many(self, records: list[EditRecord], masks: list[NeuronMask | None]) -> list[EditOutcome]:
        """Train the edits together on their united masks and apply them; one outcome per record.

        Under a Trainer on several ranks with the ``batch`` or ``sequential`` protocol this is a
        collective call: every rank passes its share of the step's records (possibly none) and
        all ranks train and apply the same update (see :meth:`shared_edit`).
        """
        return self._edit(records, masks, self.shared_edit())

    def shared_edit(self) -> SharedEdit:
        """The ranks that train each edit together: all of them for ``batch`` and ``sequential``
        under a Trainer, this process alone otherwise (``single``: every rank edits its own copy)."""
        if self._trainer is None or self.protocol == "single" or self.trainer.world_size == 1:
            return SharedEdit()
        return SharedEdit(self.trainer.strategy)

    def _edit(self, records: list[EditRecord], masks: list[NeuronMask | None], ranks: SharedEdit,
              require_masks: bool = False) -> list[EditOutcome]:
        start = time.perf_counter()
        self.causal_lm.eval()
        self._prepare_anchors()
        cfg = self.loss_config
        prompts, targets, units = self._rows(records)
        # The whole batch, in the order one process with every rank's records would see it: the
        # DataModule deals records to ranks in turn, so position j of rank r is global j * R + r.
        shares = ranks.gather(([r.id for r in records], [None if m is None else NeuronMask(m.record_id, m.layers) for m in masks], len(units)))
        every = sorted((j, r, rid, m) for r, (ids, ms, _) in enumerate(shares) for j, (rid, m) in enumerate(zip(ids, ms)))
        all_ids = [rid for _, _, rid, _ in every]
        if require_masks:
            missing = [rid for _, _, rid, m in every if m is None]
            if missing:  # raised on every rank, none left waiting in a collective
                raise RuntimeError(
                    f"no neuron mask for record {missing[0]!r}: add the mke_lightning.callbacks.NeuronLocalization callback"
                )
        if not all_ids:
            return []
        n_units = sum(n for _, _, n in shares)  # training units of the whole batch: the loss is their mean
        known = [m for _, _, _, m in every if m is not None]
        mask = None if not known else known[0] if len(known) == 1 else unite_masks(known)
        with _seeded(zlib.crc32("\n".join([str(self.init_seed), *all_ids]).encode()), self.device):
            handle = self._attach(mask)  # the same random start on every rank and in every run

        def outcomes(steps: int, loss_v: float, p_new: list[float], failed: str | None = None) -> list[EditOutcome]:
            took = time.perf_counter() - start
            count = [sum(len(i) for c in self.lora_config.categories for i in m.category(c).values())
                     if m is not None and self.method == "memla" else handle.count() if handle else 0 for m in masks]
            return [EditOutcome(r.id, steps, loss_v, p, n, took, failed) for r, n, p in zip(records, count, p_new)]

        if handle is None:
            if ranks.rank == 0:
                log.warning("records %s: no neuron located; the edit changes nothing", all_ids)
            return outcomes(0, float("nan"), [float("nan")] * len(records))
        params = handle.parameters()
        anchors = self._anchor_ids if ranks.rank == 0 else []  # one rank carries the KL term of the whole batch
        pad = self.tokenizer.pad_token_id
        if prompts or anchors:
            # Anchor rows predict one (unused) token at their last position.
            rows, row_targets = prompts + anchors, targets + [[0]] * len(anchors)
        else:
            # Padding (no record here this step): a one-token row, so that this rank's forward and
            # backward meet the others' where the weights are partitioned (ZeRO-3 gathers them in both).
            rows, row_targets = [[pad]], [[pad]]
        groups = cfg.length_groups if self._trainer is None or self.trainer.world_size == 1 else 1
        batch = pack_groups(rows, row_targets, pad, groups).to(self.device)
        opt = self.optimizer_factory(params)
        steps, loss_v, p_new = 0, float("nan"), [0.0] * len(records)
        for steps in range(1, cfg.max_steps + 1):
            logits = grouped_target_logits(self.causal_lm, batch)  # per row: [len(target), V] at its target positions
            if prompts or anchors:
                lp = row_logprobs(logits[: len(targets)], targets) if targets else []  # per record row: [len(target)]
                loss = logits[0].new_zeros((), dtype=torch.float32)
                for _, i, j in units:
                    loss = loss + cfg.new_weight * (-lp[i].sum() / len(targets[i]))
                    if j is not None:
                        loss = loss + cfg.true_weight * lp[j].sum().exp()
                loss = loss / n_units
                if anchors:
                    loss = loss + cfg.kl_weight * self.anchor_kl(torch.cat(logits[len(targets):]))  # each anchor's last position
                part = float(loss.detach())
                p_unit = [float(lp[i].detach().sum().exp()) for _, i, _ in units]
            else:
                # zero, with a graph over every parameter of the update: its gradients are zeros
                loss = (logits[0].float().sum() + sum(p.sum() for p in params)) * 0
                part, p_unit = 0.0, []
            p_new = [min((p for (k, _, _), p in zip(units, p_unit) if k == r), default=float("nan")) for r in range(len(records))]
            below = sum(1 for p in p_new if not p > cfg.stop_prob)
            loss_v, below = ranks.sum(part, below)  # the whole batch's loss; its records not yet above stop_prob
            if not math.isfinite(loss_v):
                handle.discard()
                return self._rolled_back(outcomes(steps, loss_v, p_new, f"loss is {loss_v} at step {steps}"), all_ids, ranks)
            if loss_v < cfg.stop_loss or below == 0:
                break
            opt.zero_grad(set_to_none=True)
            self._backward(loss)
            ranks.sum_grads(params)
            opt.step()
            handle.clamp_norms()
        if not all(torch.isfinite(p).all() for p in params):
            handle.discard()
            return self._rolled_back(outcomes(steps, loss_v, p_new, "the trained update holds NaN or inf"), all_ids, ranks)
        delta = handle.to_delta()
        undo = apply_delta(self.causal_lm, self.arch, delta, self.lora_config.apply)
        if self.save_deltas and ranks.rank == 0:  # shared: every rank holds the same delta; rank 0 writes it
            self._save_delta(all_ids, delta)
        if self.protocol == "sequential":
            self.applied.append((all_ids, delta))
        else:
            self._restore = undo
        return outcomes(steps, loss_v, p_new)

    def _save_delta(self, record_ids: list[str], delta: NeuronDelta) -> None:
        """``<log dir>/deltas/<record id>.safetensors`` (sequential: ``<step>_<first id>``, applied in file-name order)."""
        folder = self._delta_dir
        if folder is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in record_ids[0])
        name = f"{len(self.applied):06d}_{safe}" if self.protocol == "sequential" else safe
        delta.save(folder / f"{name}.safetensors", metadata={
            "records": record_ids, "method": self.method_name, "protocol": self.protocol,
            "model": self.lm_config.name_or_path, "edit_language": self.edit_language,
        })

    def _rolled_back(self, outcomes: list[EditOutcome], record_ids: list[str], ranks: SharedEdit) -> list[EditOutcome]:
        """The edits' adapters are dropped (the weights were never touched); say why (once for a shared edit)."""
        if outcomes and ranks.rank == 0:
            log.warning("records %s: edit rolled back: %s", record_ids, outcomes[0].failed)
        return outcomes

    def _backward(self, loss: torch.Tensor) -> None:
        # Through the strategy under a Trainer; plainly when used as a library.
        if self._trainer is not None:
            self.manual_backward(loss)
        else:
            loss.backward()

    @torch.no_grad()
    def restore(self) -> None:
        """Undo the last edit exactly (merged or applied on top)."""
        if self._restore is not None:
            self._restore()
            self._restore = None

    # -- Lightning hooks ----------------------------------------------------
    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        return batch  # records are text; they are tokenised onto the device per edit

    def training_step(self, batch: list[EditRecord], batch_idx: int):
        ranks = self.shared_edit()
        if len(batch) == 0 and ranks.size == 1:
            return None  # padding: this rank's share is shorter than another's
        if self.protocol == "single" and len(batch) != 1:
            raise ValueError(
                f"the single protocol takes one edit per batch, got {len(batch)}; set data.batch_size: 1 "
                "or model.protocol: batch"
            )
        # A shared edit takes every rank, a padding one (empty batch) included: it trains and applies the update too.
        masks = [self.neuron_masks.get(record.id) for record in batch]
        outcomes = self._edit(list(batch), masks, ranks, require_masks=self.needs_masks)
        self.outcomes.extend(outcomes)
        if not outcomes:
            return None
        first = outcomes[0]
        self.log_dict(
            {"edit/steps": float(first.steps), "edit/p_new": min(o.p_new for o in outcomes), "edit/neurons": float(sum(o.neurons for o in outcomes)),
             "edit/seconds": first.seconds, "edit/failed": float(first.failed is not None)},
            batch_size=len(batch), on_step=True, prog_bar=False,
        )
        failed = f", rolled back: {first.failed}" if first.failed else ""
        rank_zero_info(
            f"edit {len(self.resumed) + len(self.outcomes)} ({', '.join(o.record_id for o in outcomes)}): {first.steps} steps, "
            f"P(new) {min(o.p_new for o in outcomes):.3f}, {sum(o.neurons for o in outcomes)} neurons, {first.seconds:.1f} s{failed}"
        )
        return None

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Lightning runs callbacks' on_train_batch_end before this one: they
        # have evaluated the edited model by now.
        self.restore()

    def on_train_end(self) -> None:
        self.restore()
        self._write_edit_log()

    # -- checkpoint and resume ----------------------------------------------
    def _edit_log(self) -> list[dict]:
        """Every edit done so far on every rank (a collective call when several ranks run)."""
        mine = [asdict(o) for o in self.resumed + self.outcomes]
        if self._trainer is not None and self.trainer.world_size > 1:
            import torch.distributed as dist

            parts: list = [None] * self.trainer.world_size
            dist.all_gather_object(parts, mine)
            mine = [d for part in parts for d in part]
        seen: dict[str, dict] = {}
        for d in mine:
            seen.setdefault(d["record_id"], d)
        return list(seen.values())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["mke_edit_log"] = self._edit_log()
        # sequential: the edits kept in the model, as deltas (never the model itself)
        checkpoint["mke_applied"] = [
            {"records": ids, "layers": {l: (idx.cpu(), v.detach().float().cpu()) for l, (idx, v) in d.layers.items()}}
            for ids, d in self.applied
        ]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.resumed = [EditOutcome(**d) for d in checkpoint.get("mke_edit_log", [])]
        if checkpoint.get("mke_applied") and self.causal_lm is None:
            self.configure_model()
        for item in checkpoint.get("mke_applied", []):
            delta = NeuronDelta({int(l): t for l, t in item["layers"].items()})
            apply_delta(self.causal_lm, self.arch, delta, self.lora_config.apply)
            self.applied.append((list(item["records"]), delta))

    def on_fit_start(self) -> None:
        log_dir = self.trainer.log_dir if self.save_deltas else None  # a collective call: every rank makes it here
        self._delta_dir = Path(log_dir) / "deltas" if log_dir else None
        if not self.resumed:
            return
        dm = self.trainer.datamodule
        if not hasattr(dm, "resume_after"):
            raise RuntimeError(f"resuming needs a DataModule with resume_after(); {type(dm).__name__} has none")
        steps = self.trainer.fit_loop.epoch_loop.batch_progress.current.completed
        dm.resume_after({o.record_id for o in self.resumed}, steps)
        log.info("resuming after %d edits (%d batches per rank)", len(self.resumed), steps)

    def _write_edit_log(self) -> None:
        """One JSON line per edit of this rank (``edit_log.jsonl``, or ``edit_log.rank<R>.jsonl`` on several ranks)."""
        mine = (self.resumed if self.trainer.is_global_zero else []) + self.outcomes
        failed = [o for o in mine if o.failed]
        if failed:
            log.warning("%d of %d edits rolled back: %s", len(failed), len(mine),
                        "; ".join(f"{o.record_id}: {o.failed}" for o in failed))
        log_dir = self.trainer.log_dir if self._trainer is not None else None
        if not log_dir:
            return
        name = "edit_log.jsonl" if self.trainer.world_size == 1 else f"edit_log.rank{self.trainer.global_rank}.jsonl"
        path = Path(log_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(asdict(o)) + "\n" for o in mine), encoding="utf-8")

    def validation_step(self, batch: list[EditRecord], batch_idx: int):
        return None  # pre-edit evaluation is done by the evaluation callback

    def test_step(self, batch: list[EditRecord], batch_idx: int):
        return None
