"""Edit data: one record schema, an adapter per benchmark format, and the DataModule.

Adapters: :mod:`~mke_lightning.data.jsonl` (native), :mod:`~mke_lightning.data.mzsre`,
:mod:`~mke_lightning.data.bizsre`, :mod:`~mke_lightning.data.mkeb`,
:mod:`~mke_lightning.data.mlake`, :mod:`~mke_lightning.data.mquake`,
:mod:`~mke_lightning.data.zsre`. :func:`open_source` reads any of them lazily.
"""

from mke_lightning.data.bizsre import read_bizsre
from mke_lightning.data.datamodule import EditDataModule, RecordList, collate_records
from mke_lightning.data.formats import FORMATS, detect_format, open_source
from mke_lightning.data.jsonl import demo_records, read_jsonl
from mke_lightning.data.mkeb import read_mkeb
from mke_lightning.data.mlake import read_mlake
from mke_lightning.data.mquake import read_mquake
from mke_lightning.data.mzsre import read_mzsre
from mke_lightning.data.selection import select_records, shard
from mke_lightning.data.source import RecordSource
from mke_lightning.data.zsre import read_zsre

__all__ = [
    "FORMATS",
    "EditDataModule",
    "RecordList",
    "RecordSource",
    "collate_records",
    "demo_records",
    "detect_format",
    "open_source",
    "read_bizsre",
    "read_jsonl",
    "read_mkeb",
    "read_mlake",
    "read_mquake",
    "read_mzsre",
    "read_zsre",
    "select_records",
    "shard",
]
