"""The ``mke`` command: a LightningCLI over the editor and the edit data.

Subcommands: Lightning's ``fit``, ``validate``, ``test``, ``predict``,
``localize`` (only locate the neurons of the run's records, write the masks
to the cache and the summary to the log dir; see docs/localization.md), and
``report RUN_DIR...`` (compare finished runs: a bar chart of methods,
heatmaps and a table; see docs/evaluation.md). ``report`` reads files only,
so it is plain argparse, not part of the LightningCLI.
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from mke_lightning.data import EditDataModule
from mke_lightning.editor import KnowledgeEditor
from mke_lightning.trainer import MKETrainer


class MKECLI(LightningCLI):
    def __init__(self, *args, trainer_class=MKETrainer, **kwargs) -> None:
        from jsonargparse import set_parsing_settings

        set_parsing_settings(docstring_parse_attribute_docstrings=True)  # --help shows each config field's docstring
        super().__init__(*args, trainer_class=trainer_class, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "localize": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.edit_language", "model.edit_language")


def cli_main(args: list[str] | None = None) -> MKECLI:
    """Run the CLI; ``args`` replaces ``sys.argv[1:]`` (tests call it in-process)."""
    return MKECLI(KnowledgeEditor, EditDataModule, args=args, save_config_kwargs={"overwrite": True})


def main() -> None:
    """Console entry point (``mke``): returns nothing, so the exit status is 0 on success."""
    argv = sys.argv[1:]
    if argv[:1] == ["report"]:
        from mke_lightning.compare import report_main

        report_main(argv[1:])
        return
    if argv[:1] == ["export"]:
        from mke_lightning.export import export_main

        export_main(argv[1:])
        return
    cli_main()


if __name__ == "__main__":
    main()
