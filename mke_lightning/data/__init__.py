"""Edit data: the native JSONL format, dataset adapters and the DataModule."""

from mke_lightning.data.datamodule import EditDataModule
from mke_lightning.data.jsonl import demo_records, read_jsonl
from mke_lightning.data.mzsre import read_mzsre

__all__ = ["EditDataModule", "demo_records", "read_jsonl", "read_mzsre"]
