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
:class:`~mke_lightning.editing.neuron_delta.NeuronDelta`, applied merged or on top.
``protocol`` says what happens next: ``single`` undoes each edit after the
callbacks have evaluated it, ``batch`` trains a batch's edits together (united
masks) and undoes them, ``sequential`` keeps every edit.

On several ranks, ``single`` edits each rank's records on its own copy of the
model. ``batch`` and ``sequential`` share each step's edit across ranks
(:class:`~mke_lightning.modeling.collectives.SharedEdit`): each rank holds its
share of the step's records, the masks are gathered and united, every rank starts the same update (seeded by
the records' ids) and back-propagates its share of the loss (the mean over
the whole batch's training units), the gradients are summed through the
strategy, and the stopping rule reads the whole batch's loss. Every rank then
applies the same update, as one process editing the whole batch would.

Callbacks reach the model through a few attributes that any LightningModule
can offer: attributes ``causal_lm`` (a Hugging Face causal LM), ``tokenizer``
and ``arch`` (an :class:`~mke_lightning.modeling.architectures.ArchSpec`), and a dict
``neuron_masks`` (record id -> :class:`~mke_lightning.localization.neurons.NeuronMask`).

The editor's other jobs live beside it: the edit log (:mod:`.edit_log`), the
delta files (:mod:`.delta_files`), its checkpoint state and resume
(:mod:`.resume`), and what the run is (:mod:`.describe`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info

from mke_lightning.data.records import EditRecord
from mke_lightning.editing import resume
from mke_lightning.editing.delta_files import resumed_folder
from mke_lightning.editing.describe import check_optimizer, describe_editor
from mke_lightning.editing.edit_log import EditOutcome, step_line, step_metrics, write_edit_log
from mke_lightning.editing.edit_loop import UpdateResult
from mke_lightning.editing.masked_lora import LoRAConfig
from mke_lightning.editing.methods import method_class
from mke_lightning.editing.methods.locate_edit import SolveConfig
from mke_lightning.editing.neuron_delta import NeuronDelta, OnTop, Restore
from mke_lightning.editing.objective import AnchorKL, EditLossConfig, NeighbourKL, training_rows
from mke_lightning.editing.preserve import Preservation, PreservationConfig
from mke_lightning.editing.step import apply_update, gather_step, prepare_objective
from mke_lightning.editing.value_update import ValueUpdateConfig
from mke_lightning.localization.neurons import NeuronMask
from mke_lightning.modeling.collectives import SharedEdit
from mke_lightning.modeling.loading import ModelConfig, load_for_strategy
from mke_lightning.reporting.run_settings import run_settings

log = logging.getLogger(__name__)

EDIT_PROTOCOLS = ("single", "batch", "sequential")  # the editing protocols (metrics.PROTOCOLS are the metric ones)

TrainingRows = tuple[list[list[int]], list[list[int]], list[tuple[int, int, int | None]]]
"""Prompt rows, target rows and training units ``(record index, new-target row, old-target row)``."""

__all__ = ["EDIT_PROTOCOLS", "EditLossConfig", "EditOutcome", "KnowledgeEditor"]


class KnowledgeEditor(L.LightningModule):
    """Edits facts of a causal LM, one registered method per run (see the module docstring).

    Args:
        lm: which causal LM to load and how.
        edit_language: language of the edit prompt the update is trained on.
        lora: masked-LoRA adapters and merge settings.
        loss: edit objective and stopping rule.
        optimizer: optimiser factory for the adapters of each edit (default Adam, lr 1e-3).
        protocol: ``single`` (one edit per batch, undone after its evaluation), ``batch`` (the batch's edits
            optimised together on their united masks, undone after evaluation) or ``sequential`` (each batch's
            edits stay: later edits are made on the edited model). ``batch`` and ``sequential`` on several
            ranks: each step's edit is trained on every rank's batch together.
        method: a registered method (:mod:`mke_lightning.editing.methods`): ``memla``, ``lora``, ``ft_l``,
            ``lafn`` and the locate-then-edit family (see the module docstring).
        values: the direct value-vector update of ``ft_l`` and ``lafn``.
        solve: the closed-form edits of ``rome``, ``memit`` and ``alphaedit`` (layers, target vector, statistics).
        preserve: preservation of a trained method's update (docs/preservation.md): a loss term for its output
            change on ordinary text and on earlier edits' keys, and a bound on each neuron's change; null: none
            (the authors' reading).
        train_languages: languages whose edit prompts (each with its own new target) the edit is trained on;
            null: the edit language only.
        save_deltas: write each edit (``single``/``batch``: one file per batch; ``sequential``: one file per
            step, in order) as a delta under ``<log dir>/deltas/``.
        init_seed: seed of each update's random start (LoRA's ``A``, ``values.init_std``), combined with the ids
            of the edit's records: the same start on every rank, in every run and after a restart, whatever
            was drawn before.
    """

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
        super().__init__()
        self.save_hyperparameters()
        if protocol not in EDIT_PROTOCOLS:
            raise ValueError(f"protocol must be one of {EDIT_PROTOCOLS}, got {protocol!r}")
        self.lm_config, self.lora_config = lm or ModelConfig(), lora or LoRAConfig()
        self.loss_config, self.values_config = loss or EditLossConfig(), values or ValueUpdateConfig()
        self.solve_config = solve or SolveConfig()
        self.preservation = Preservation(preserve) if preserve is not None and preserve.active else None
        self.edit_language, self.train_languages, self.protocol = edit_language, train_languages, protocol
        self.optimizer_factory, self.save_deltas, self.init_seed = optimizer, save_deltas, init_seed
        self.method = method
        self.method_impl = method_class(method)(self)
        self.method_impl.check()
        if train_languages is not None and not train_languages:
            raise ValueError("train_languages is empty; use null for the edit language only")
        self.automatic_optimization = False
        self.causal_lm, self.tokenizer, self.arch = None, None, None
        self.neuron_masks: dict[str, NeuronMask] = {}
        self.applied: list[tuple[list[str], NeuronDelta]] = []  # sequential: the edits kept in the model, in order
        self.outcomes: list[EditOutcome] = []
        self.anchors = AnchorKL(self.loss_config, edit_language)
        self.neighbours = NeighbourKL(self.loss_config, train_languages or [edit_language])
        self._restore: Restore | OnTop | None = None
        self._delta_dir: Path | None = None
        self._base_fingerprint: str | None = None  # the model the run began with (delta files name it)
        self._saved = resume.SavedEdits()  # what a checkpoint gave back, until the fit starts
        self._run_subjects_excluded = False  # the neighbour term knows the run's subjects (step.prepare_objective)

    # -- model ------------------------------------------------------------
    def configure_model(self) -> None:
        if self.causal_lm is None:  # built once, where the strategy wants it (ZeRO-3: partitioned as it is built)
            strategy = self.trainer.strategy if self._trainer is not None else None
            self.causal_lm, self.tokenizer, self.arch, self._hf_deepspeed = load_for_strategy(self.lm_config, strategy)

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

    @property
    def resumed(self) -> list[EditOutcome]:
        """Edits done (on any rank) before a restart from a checkpoint."""
        return self._saved.outcomes

    def run_info(self) -> dict:
        """Method, protocol and settings, for the run's ``results.json``."""
        return describe_editor(self)

    # -- the objective -------------------------------------------------------
    def anchor_kl(self, logits: torch.Tensor) -> torch.Tensor:
        """KL(pre-edit || now) of the next-token distribution, mean over the anchors: ``logits`` ``[A, V]``."""
        return self.anchors(logits)

    def _rows(self, records: list[EditRecord]) -> TrainingRows:
        """Prompt and target rows and training units of ``records`` (:func:`.objective.training_rows`)."""
        return training_rows(self.tokenizer, records, self.train_languages or [self.edit_language], self.edit_language,
                             self.loss_config)

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

    def _edit(self, records: list[EditRecord], masks: list[NeuronMask | None], ranks: SharedEdit,
              require_masks: bool = False) -> list[EditOutcome]:
        start = time.perf_counter()
        prepare_objective(self, records)
        batch = gather_step(records, masks, self._rows(records), ranks, self.init_seed, require_masks)
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
        if result.delta is not None:
            delta, undo = apply_update(self, batch, result.delta)
            if self.protocol == "sequential":
                self.applied.append((batch.all_ids, delta))
            else:
                self._restore = undo
        return outcomes

    @torch.no_grad()
    def restore(self) -> None:
        """Undo the last edit exactly (merged or applied on top)."""
        if self._restore is not None:
            self._restore()
            self._restore = None

    # -- Lightning hooks ----------------------------------------------------
    def setup(self, stage: str) -> None:
        """Say what the run is (run settings), and check the optimiser's settings before the run does any work.

        Lightning calls this before the model is built and before any callback's ``on_fit_start``
        (localisation): a bad setting (a negative learning rate) is refused now, not at the first
        edit after the whole localisation stage.
        """
        run_settings(self._trainer).add("module", lambda: {**self.run_info(), "model": self.lm_config.name_or_path})
        if stage == "fit":
            check_optimizer(self.optimizer_factory, self.hparams.get("optimizer"))

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
        if outcomes:
            self.log_dict(step_metrics(outcomes), batch_size=len(batch), on_step=True, prog_bar=False)
            rank_zero_info(step_line(len(self.resumed) + len(self.outcomes), outcomes))
        return None

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Lightning runs callbacks' on_train_batch_end before this one: they
        # have evaluated the edited model by now.
        self.restore()

    def on_train_end(self) -> None:
        self.restore()
        mine = (self.resumed if self.trainer.is_global_zero else []) + self.outcomes
        log_dir = self.trainer.log_dir if self._trainer is not None else None
        write_edit_log(mine, log_dir, self.trainer.world_size, self.trainer.global_rank)

    def validation_step(self, batch: list[EditRecord], batch_idx: int):
        return None  # pre-edit evaluation is done by the evaluation callback

    def test_step(self, batch: list[EditRecord], batch_idx: int):
        return None

    # -- checkpoint and resume (mke_lightning.editing.resume) ----------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        resume.save(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._saved = resume.load(self, checkpoint)

    def on_fit_start(self) -> None:
        log_dir = self.trainer.log_dir if self.save_deltas else None  # a collective call: every rank makes it
        self._delta_dir = Path(log_dir) / "deltas" if log_dir else None
        if self._delta_dir is not None and self._saved.delta_dir:
            self._delta_dir = resumed_folder(self._delta_dir, self._saved.delta_dir, self.logger)
        resume.start_fit(self, self._saved)
