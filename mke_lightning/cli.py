"""The ``mke`` command: a LightningCLI over the editor and the edit data."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from mke_lightning.data import EditDataModule
from mke_lightning.editor import KnowledgeEditor


class MKECLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.edit_language", "model.edit_language")


def cli_main(args: list[str] | None = None) -> MKECLI:
    """Run the CLI; ``args`` replaces ``sys.argv[1:]`` (tests call it in-process)."""
    return MKECLI(KnowledgeEditor, EditDataModule, args=args, save_config_kwargs={"overwrite": True})


def main() -> None:
    """Console entry point (``mke``): returns nothing, so the exit status is 0 on success."""
    cli_main()


if __name__ == "__main__":
    main()
