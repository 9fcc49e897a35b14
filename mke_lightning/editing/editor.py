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

Methods are registered classes (:mod:`mke_lightning.editing.methods`); the editor
holds one per run and never branches on a method's name. A trained method
attaches an update that the shared loop (:func:`~mke_lightning.editing.edit_loop.train_update`)
optimises on the shared objective (:mod:`mke_lightning.editing.objective`); a solved
one computes its update itself. Either yields a
:class:`~mke_lightning.editing.neuron_delta.NeuronDelta`, applied merged or on top. ``protocol`` says what happens next: ``single`` undoes each edit
after the callbacks have evaluated it, ``batch`` trains a batch's edits
together (united masks) and undoes them, ``sequential`` keeps every edit.

On several ranks, ``single`` edits each rank's records on its own copy of the
model. ``batch`` and ``sequential`` share each step's edit across ranks
(:class:`~mke_lightning.modeling.collectives.SharedEdit`): each rank holds its share of the step's records, the
masks are gathered and united, every rank starts the same update (seeded by
the records' ids) and back-propagates its share of the loss (the mean over
the whole batch's training units), the gradients are summed through the
strategy, and the stopping rule reads the whole batch's loss. Every rank then
applies the same update, as one process editing the whole batch would.

Callbacks reach the model through a few attributes that any LightningModule
can offer: attributes ``causal_lm`` (a Hugging Face causal LM), ``tokenizer``
and ``arch`` (an :class:`~mke_lightning.modeling.architectures.ArchSpec`), and a dict
``neuron_masks`` (record id -> :class:`~mke_lightning.localization.neurons.NeuronMask`).
"""

from __future__ import annotations

import functools
import json
import logging
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info

from mke_lightning.modeling.collectives import SharedEdit, gather_object
from mke_lightning.editing.edit_loop import EditStep, UpdateResult
from mke_lightning.editing.masked_lora import LoRAConfig, apply_delta
from mke_lightning.editing.methods import method_class
from mke_lightning.editing.methods.locate_edit import SolveConfig
from mke_lightning.modeling.loading import ModelConfig, load_causal_lm
from mke_lightning.editing.neuron_delta import NeuronDelta, OnTop, Restore
from mke_lightning.localization.neurons import CATEGORIES, NeuronMask
from mke_lightning.editing.objective import AnchorKL, EditLossConfig, NeighbourKL, training_rows
from mke_lightning.editing.preserve import Preservation, PreservationConfig
from mke_lightning.data.records import EditRecord
from mke_lightning.editing.value_update import ValueUpdateConfig

log = logging.getLogger(__name__)


EDIT_PROTOCOLS = ("single", "batch", "sequential")  # the editing protocols (metrics.PROTOCOLS are the metric ones)


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
        protocol: Literal["single", "batch", "sequential"] = "single",
        method: str = "memla",
        values: ValueUpdateConfig | None = None,
        solve: SolveConfig | None = None,
        preserve: PreservationConfig | None = None,
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
            method: a registered method (:mod:`mke_lightning.editing.methods`): ``memla``, ``lora``, ``ft_l``,
                ``lafn`` and the locate-then-edit family (see the module docstring).
            values: the direct value-vector update of ``ft_l`` and ``lafn``.
            solve: the closed-form edits of ``rome``, ``memit`` and ``alphaedit`` (layers, target vector, statistics).
            preserve: preservation of a trained method's update (docs/preservation.md): a loss term for
                its output change on ordinary text and on earlier edits' keys, and a bound on each
                neuron's change; null: none (the authors' reading).
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
        if protocol not in EDIT_PROTOCOLS:
            raise ValueError(f"protocol must be one of {EDIT_PROTOCOLS}, got {protocol!r}")
        self.protocol = protocol
        self.values_config = values or ValueUpdateConfig()
        self.solve_config = solve or SolveConfig()
        self.preservation = Preservation(preserve) if preserve is not None and preserve.active else None
        self.method = method
        self.method_impl = method_class(method)(self)
        self.method_impl.check()
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
        self.anchors = AnchorKL(self.loss_config, edit_language)
        self.neighbours = NeighbourKL(self.loss_config, train_languages or [edit_language])
        self._run_subjects_excluded = False

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
        """The method's name in results (MEMLA's ablations name the category switched off)."""
        return self.method_impl.label

    @property
    def needs_masks(self) -> bool:
        """Whether each record needs located neurons (the NeuronLocalization callback)."""
        return self.method_impl.needs_masks

    @property
    def world_size(self) -> int:
        return 1 if self._trainer is None else self.trainer.world_size

    def run_info(self) -> dict:
        """Method, protocol and settings, for the run's ``results.json``."""
        opt = self.hparams.get("optimizer")  # LightningCLI: the class path and init args as given
        if not isinstance(opt, (dict, str)):
            opt = _settings_of(self.optimizer_factory)
        return {
            "method": self.method_name,
            "protocol": self.protocol,
            "train_languages": self.train_languages or [self.edit_language],
            "settings": {
                "lora": None,
                "values": None,
                **self.method_impl.settings(),
                "loss": asdict(self.loss_config),
                "optimizer": opt,
                "dtype": self.lm_config.dtype,
                "load_in_8bit": self.lm_config.load_in_8bit,
            },
        }

    # -- the objective -------------------------------------------------------
    def anchor_kl(self, logits: torch.Tensor) -> torch.Tensor:
        """KL(pre-edit || now) of the next-token distribution, mean over the anchors: ``logits`` ``[A, V]``."""
        return self.anchors(logits)

    def _rows(self, records: list[EditRecord]) -> tuple[list[list[int]], list[list[int]], list[tuple[int, int, int | None]]]:
        """Prompt and target rows and training units of ``records`` (:func:`~mke_lightning.editing.objective.training_rows`)."""
        return training_rows(self.tokenizer, records, self.train_languages or [self.edit_language], self.edit_language, self.loss_config)

    def backward_edit(self, loss: torch.Tensor) -> None:
        """Back-propagate an edit's loss: through the strategy under a Trainer, plainly as a library."""
        if self._trainer is not None:
            self.manual_backward(loss)
        else:
            loss.backward()

    # -- edits ------------------------------------------------------------
    def edit(self, record: EditRecord, mask: NeuronMask) -> EditOutcome:
        """Train and apply one edit; the undo is kept for :meth:`restore`."""
        return self.edit_many([record], [mask])[0]

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

    def edit_batch(self, records: list[EditRecord], masks: list[NeuronMask | None], ranks: SharedEdit,
                   require_masks: bool = False) -> EditStep | None:
        """The step's edit as every method sees it (``None``: no record on any rank)."""
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
            return None
        known = [m for _, _, _, m in every if m is not None]
        mask = None if not known else known[0] if len(known) == 1 else unite_masks(known)
        seed = zlib.crc32("\n".join([str(self.init_seed), *all_ids]).encode())
        return EditStep(records, masks, all_ids, mask, prompts, targets, units, sum(n for _, _, n in shares), ranks, seed)

    def _exclude_run_subjects(self, records: list[EditRecord]) -> None:
        """The neighbour term never uses a subject of the run's records (those of the DataModule, else these)."""
        if self._run_subjects_excluded or self.loss_config.neighbour_weight <= 0:
            return
        dm = self.trainer.datamodule if self._trainer is not None else None
        every = list(getattr(dm, "records", None) or records)
        self.neighbours.exclude(f.subject for r in every for f in (r.facts(l) for l in r.languages))
        self._run_subjects_excluded = self._trainer is not None  # as a library: each call's own records

    def _edit(self, records: list[EditRecord], masks: list[NeuronMask | None], ranks: SharedEdit,
              require_masks: bool = False) -> list[EditOutcome]:
        start = time.perf_counter()
        self.causal_lm.eval()
        self.anchors.prepare(self.causal_lm, self.tokenizer, self.device)
        self._exclude_run_subjects(records)
        batch = self.edit_batch(records, masks, ranks, require_masks)
        if batch is None:
            return []
        result: UpdateResult = self.method_impl.make_update(batch)
        took = time.perf_counter() - start
        outcomes = [EditOutcome(r.id, result.steps, result.loss, p, n, took, result.failed)
                    for r, n, p in zip(records, result.counts, result.p_new)]
        if result.failed:
            if outcomes and ranks.rank == 0:
                log.warning("records %s: edit rolled back: %s", batch.all_ids, result.failed)
            return outcomes
        if result.delta is None:
            return outcomes
        if self.preservation is not None:
            result.delta = self.preservation.bound(self, result.delta)
            if self.protocol == "sequential":  # the keys this edit writes on (every rank's), before it is applied
                mine = [batch.prompts[i] for _, i, _ in batch.units]
                self.preservation.remember(self, [p for part in ranks.gather(mine) for p in part], sorted(result.delta.layers))
        undo = apply_delta(self.causal_lm, self.arch, result.delta, self.lora_config.apply)
        if self.save_deltas and ranks.rank == 0:  # shared: every rank holds the same delta; rank 0 writes it
            self._save_delta(batch.all_ids, result.delta)
        if self.protocol == "sequential":
            self.applied.append((batch.all_ids, result.delta))
        else:
            self._restore = undo
        return outcomes

    def _save_delta(self, record_ids: list[str], delta: NeuronDelta) -> None:
        """``<log dir>/deltas/<record id>.safetensors`` (sequential: ``<step>_<first id>``, applied in file-name order)."""
        folder = self._delta_dir
        if folder is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in record_ids[0])
        name = f"{len(self.applied):06d}_{safe}" if self.protocol == "sequential" else safe
        meta = {
            "records": record_ids, "method": self.method_name, "protocol": self.protocol,
            "model": self.lm_config.name_or_path, "edit_language": self.edit_language,
            "dtype": self.lm_config.dtype, "load_in_8bit": self.lm_config.load_in_8bit,
        }
        fingerprint = getattr(self, "_base_fingerprint", None)  # set in on_fit_start, before any edit
        if fingerprint:  # the model the run began with: mke export and load_edits check it
            meta["model_fingerprint"] = fingerprint
        delta.save(folder / f"{name}.safetensors", metadata=meta)

    @torch.no_grad()
    def restore(self) -> None:
        """Undo the last edit exactly (merged or applied on top)."""
        if self._restore is not None:
            self._restore()
            self._restore = None

    # -- Lightning hooks ----------------------------------------------------
    def setup(self, stage: str) -> None:
        """Check the optimiser's settings before the run does any work.

        Lightning calls this before the model is built and before any callback's ``on_fit_start``
        (localisation): a bad setting (a negative learning rate) is refused now, not at the first
        edit after the whole localisation stage. The factory builds a throw-away optimiser over
        one dummy parameter; a factory that needs more than parameters is left to the first edit.
        """
        if stage != "fit":
            return
        try:
            self.optimizer_factory([torch.nn.Parameter(torch.zeros(1))])
        except (ValueError, TypeError) as err:
            if isinstance(err, TypeError) and "argument" in str(err):
                return  # wants arguments a plain parameter list does not give
            given = self.hparams.get("optimizer")
            shown = json.dumps(given, default=str) if isinstance(given, dict) else repr(self.optimizer_factory)
            raise ValueError(
                f"model.optimizer is refused by the optimiser itself: {err} (model.optimizer: {shown}); "
                "fix it in the config (e.g. model.optimizer.init_args.lr > 0)"
            ) from err

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
        if self.world_size > 1:
            mine = [d for part in gather_object(mine, self.world_size) for d in part]
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
        # What else the rest of the run depends on: the pre-edit model's fingerprint (delta files name it),
        # the delta folder the run began writing (a resumed run goes on writing there, whatever version
        # folder its logger takes), and preservation's memory of earlier edits, in full precision.
        checkpoint["mke_base_fingerprint"] = getattr(self, "_base_fingerprint", None)
        folder = self._delta_dir
        if folder is not None:
            logger = self.logger if self._trainer is not None else None
            root = Path(logger.save_dir) / logger.name if getattr(logger, "save_dir", None) and getattr(logger, "name", None) else None
            inside = root is not None and folder.resolve().is_relative_to(root.resolve())
            checkpoint["mke_delta_dir"] = {"path": str(folder.resolve()),
                                           "in_run": folder.resolve().relative_to(root.resolve()).as_posix() if inside else None}
        checkpoint["mke_method_state"] = self.method_impl.state_dict()  # e.g. AlphaEdit's earlier edits' keys
        if self.preservation is not None:
            checkpoint["mke_preservation"] = self.preservation.state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.resumed = [EditOutcome(**d) for d in checkpoint.get("mke_edit_log", [])]
        self._resumed_fingerprint = checkpoint.get("mke_base_fingerprint")
        self._resumed_delta_dir = checkpoint.get("mke_delta_dir")
        self.method_impl.load_state_dict(checkpoint.get("mke_method_state", {}))
        kept = checkpoint.get("mke_preservation")
        if kept is not None and self.preservation is not None:
            self.preservation.load_state(kept)
        applied = [(list(item["records"]), NeuronDelta({int(l): t for l, t in item["layers"].items()}))
                   for item in checkpoint.get("mke_applied", [])]
        if self._trainer is not None and self.trainer.state.fn == "fit" and not self.trainer.strategy.restore_checkpoint_after_setup:
            # Applied in on_fit_start, which Lightning runs after every callback's: localisation (and anything
            # else taken from the model before the first edit) sees the model the run began with.
            self._to_reapply = applied
            return
        if applied and self.causal_lm is None:
            self.configure_model()
        for ids, delta in applied:
            apply_delta(self.causal_lm, self.arch, delta, self.lora_config.apply)
            self.applied.append((ids, delta))

    def on_fit_start(self) -> None:
        log_dir = self.trainer.log_dir if self.save_deltas else None  # a collective call: every rank makes it here
        self._delta_dir = Path(log_dir) / "deltas" if log_dir else None
        saved_dir = getattr(self, "_resumed_delta_dir", None)
        if self._delta_dir is not None and saved_dir:
            # A resumed run writes its deltas where the run began: one folder holds every edit once (the
            # logger may have given this restart a new version folder).
            logger = self.logger
            root = Path(logger.save_dir) / logger.name if getattr(logger, "save_dir", None) and getattr(logger, "name", None) else None
            where = [root / saved_dir["in_run"]] if root is not None and saved_dir.get("in_run") else []
            where.append(Path(saved_dir["path"]))
            folder = next((p for p in where if p.is_dir()), where[0])
            if not folder.is_dir():
                log.warning("the delta folder this run began writing (%s) is gone; the deltas of the edits made "
                            "before the restart are lost, the later ones go there", folder)
            if folder.resolve() != self._delta_dir.resolve():
                rank_zero_info(f"deltas: this resumed run goes on writing into {folder}, where the run began "
                               f"(not {self._delta_dir})")
            self._delta_dir = folder
        reapply = getattr(self, "_to_reapply", None) or []
        self._to_reapply = None
        saved_fp = getattr(self, "_resumed_fingerprint", None)
        if self.causal_lm is not None and (self.save_deltas or saved_fp):
            from mke_lightning.localization.cache import model_fingerprint

            self._base_fingerprint = model_fingerprint(self.causal_lm, self.tokenizer, self.arch)  # before any edit
            if saved_fp and saved_fp != self._base_fingerprint:
                raise ValueError(
                    f"resuming: the checkpoint's edits were made on model {saved_fp[:16]}, this run's model is "
                    f"{self._base_fingerprint[:16]} (model.lm.name_or_path {self.lm_config.name_or_path!r}, dtype "
                    f"{self.lm_config.dtype}); resume with the model the run began with, or start afresh without --ckpt_path")
        if reapply:
            # What an uninterrupted run takes from the unedited model at its first edit, taken now, before the
            # kept edits come back: the anchors' pre-edit distributions and the preservation statistics.
            was_training = self.causal_lm.training
            self.causal_lm.eval()
            try:
                self.anchors.prepare(self.causal_lm, self.tokenizer, self.device)
                if self.preservation is not None and self.preservation.cfg.penalty > 0:
                    self.preservation._statistics(self)
            finally:
                self.causal_lm.train(was_training)
            for ids, delta in reapply:
                apply_delta(self.causal_lm, self.arch, delta, self.lora_config.apply)
                self.applied.append((ids, delta))
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
