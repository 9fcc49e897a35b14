"""The ``mke`` command: a LightningCLI over the editor and the edit data.

Subcommands: Lightning's ``fit``, ``validate``, ``test``, ``predict``,
``localize`` (only locate the neurons of the run's records, write the masks
to the cache and the summary to the log dir; see docs/localization.md), and
``report RUN_DIR...`` (compare finished runs: a bar chart of methods,
heatmaps and a table; see docs/evaluation.md). ``report`` reads files only,
so it is plain argparse, not part of the LightningCLI.

Errors: ``mke`` prints ``mke: error: <what is wrong and what to do>`` on
stderr and exits with status 1, without the Python traceback; set
``MKE_TRACEBACK=1`` to have the traceback printed as well (docs/errors.md).
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningCLI

from mke_lightning.data import EditDataModule
from mke_lightning.editing.editor import KnowledgeEditor
from mke_lightning.trainer import MKETrainer


class MKECLI(LightningCLI):
    def __init__(self, *args, trainer_class=MKETrainer, **kwargs) -> None:
        from jsonargparse import set_parsing_settings

        set_parsing_settings(docstring_parse_attribute_docstrings=True)  # --help shows each config field's docstring
        super().__init__(*args, trainer_class=trainer_class, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "localize": {"model", "datamodule"}}

    # Commands outside the Trainer (reading runs, merging deltas, computing statistics): run by ``main`` before the
    # LightningCLI parses anything, listed here so that ``mke --help`` shows them beside the others.
    FILE_COMMANDS = {
        "report": "Compare finished runs: tables, a bar chart of methods and heatmaps (mke report RUN_DIR... --help).",
        "export": "Merge saved edits (delta files) into a model folder (mke export --help).",
        "key-stats": "Compute and cache a model's key statistics ahead of a run (mke key-stats --help).",
    }

    def _add_subcommands(self, parser, **kwargs) -> None:
        super()._add_subcommands(parser, **kwargs)
        from lightning.pytorch.cli import LightningArgumentParser

        action = parser._subcommands_action  # the sub-parsers action LightningCLI just added
        for name, text in self.FILE_COMMANDS.items():
            action.add_subcommand(name, LightningArgumentParser(description=text), help=text)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.edit_language", "model.edit_language")

    # Checks made before a subcommand starts: a fault here costs nothing yet (no model loaded, no
    # neuron located, no edit made).
    def _before_run(self) -> None:
        connect = getattr(self.datamodule, "connect", None)
        if callable(connect):
            connect(self.model)  # the DataModule checks its prompts against the model once it is built
        self._check_ckpt_path()

    before_fit = before_validate = before_test = before_predict = before_localize = _before_run

    def _check_ckpt_path(self) -> None:
        """``--ckpt_path last`` must find a checkpoint, and the checkpoint must be whole."""
        from lightning.pytorch.callbacks import ModelCheckpoint

        from mke_lightning.callbacks.checkpoint import CheckpointError, check_checkpoint

        config = self.config_init.get(self.subcommand, {}) if self.subcommand else {}
        ckpt_path = config.get("ckpt_path") if hasattr(config, "get") else None
        if ckpt_path is None or ckpt_path in ("best", "hpc") or str(ckpt_path).startswith("registry"):
            return
        if ckpt_path == "last":
            folders, found = [], set()
            for callback in self.trainer.checkpoint_callbacks:
                if isinstance(callback, ModelCheckpoint):
                    found |= callback._find_last_checkpoints(self.trainer)
                    resolve = getattr(callback, "_resolve_dirpath", None)
                    if callable(resolve):
                        resolve(self.trainer)
                    folders.append(str(callback.dirpath) if callback.dirpath else "the logger's checkpoints folder")
            found = {p for p in found if os.path.exists(p)}
            if not found:
                where = f"in {', '.join(folders)}" if folders else "anywhere: no checkpoint callback is configured"
                raise CheckpointError(
                    f"--ckpt_path last: there is no checkpoint to resume from (no last.ckpt {where}). "
                    "Leave out --ckpt_path to start afresh, give the checkpoint's file (--ckpt_path PATH), or "
                    "use the run's logger settings (trainer.logger.init_args.save_dir and name) and its "
                    "mke_lightning.callbacks.EditCheckpoint callback, so that the folder is the one the run wrote"
                )
            ckpt_path = max(found, key=os.path.getmtime)  # the one Lightning will pick
        check_checkpoint(ckpt_path)


def cli_main(args: list[str] | None = None) -> MKECLI:
    """Run the CLI; ``args`` replaces ``sys.argv[1:]`` (tests call it in-process)."""
    return MKECLI(KnowledgeEditor, EditDataModule, args=args, save_config_kwargs={"overwrite": True})


TRACEBACK_VARIABLE = "MKE_TRACEBACK"  # "1": print the traceback of an error, not only its message


def main() -> None:
    """Console entry point (``mke``): exit status 0 on success, 1 on an error (its message on
    stderr, its traceback only with ``MKE_TRACEBACK=1``), 2 on a command-line mistake."""
    try:
        _main()
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # noqa: BLE001 - every error ends the same way: its message and status 1
        if os.environ.get(TRACEBACK_VARIABLE, "").strip().lower() in {"1", "true", "yes", "on"}:
            raise
        sys.stderr.write(f"mke: error: {error_message(err)}\n"
                         f"(set {TRACEBACK_VARIABLE}=1 to see where it was raised)\n")
        sys.exit(1)


def error_message(err: BaseException) -> str:
    """The message of ``err`` for the user: our own errors speak for themselves; any other error
    is prefixed with its type (``RuntimeError: CUDA out of memory ...``)."""
    from mke_lightning.callbacks.checkpoint import CheckpointError
    from mke_lightning.data.records import RecordError
    from mke_lightning.localization.neurons import MaskError

    text = str(err).strip() or type(err).__name__
    if isinstance(err, (RecordError, MaskError, CheckpointError, ValueError, FileNotFoundError)):
        return text
    return f"{type(err).__name__}: {text}"


def _main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["report"]:
        from mke_lightning.reporting.compare import report_main

        report_main(argv[1:])
        return
    if argv[:1] == ["export"]:
        from mke_lightning.editing.export import export_main

        export_main(argv[1:])
        return
    if argv[:1] == ["key-stats"]:
        from mke_lightning.editing.key_statistics import compute_main

        compute_main(argv[1:])
        return
    cli_main()


if __name__ == "__main__":
    main()
