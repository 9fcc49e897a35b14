"""A lazily read, checked sequence of edit records from any benchmark format.

An adapter (one module per format) says which files to read side by side and
how the ``i``-th item of each becomes records: a :class:`Parser`.
:class:`RecordSource` makes one streaming pass over the files that parses and
checks every item, then keeps only a small index (where each record comes
from, which languages it has) and reads records again from disk on access.

Bad input raises :class:`RecordError` naming the file, the record (index and
id), the field and the line. With ``on_error="skip"`` a bad record is left out
instead, counted in :attr:`RecordSource.skipped` and described in
:attr:`RecordSource.skip_reasons`; a JSON array broken mid-file still raises,
since nothing after the fault can be located.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from typing import Any, Callable, Iterator

import numpy as np

from mke_lightning.data.records import EditRecord, RecordError
from mke_lightning.data.spans import BadItem, ItemFile

ON_ERROR = ("raise", "skip")
MAX_REASONS = 20  # skipped records described one by one; the rest are only counted


def id_hash(record_id: str) -> int:
    """A 64-bit hash of a record id, the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(record_id.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


class Parser:
    """How one format turns items into records (subclassed by each adapter).

    Attributes:
        name: the path the user gave (named in errors that concern no one file).
        files: files read side by side: item ``i`` of each makes raw record ``i``.
    """

    name: str
    files: tuple[ItemFile, ...]

    def prepare(self, reject: Callable[[RecordError], None]) -> None:
        """Read what parsing needs besides the items (MLaKE: its multi-hop files).

        ``reject`` takes each bad input found here: it raises, or counts it.
        """

    def parse(self, items: tuple[Any, ...], index: int) -> list[EditRecord]:
        """The records of raw record ``index``; raises :class:`RecordError`."""
        raise NotImplementedError

    def notes(self) -> dict[str, Any]:
        """Counts worth reporting about the data (MLaKE: unlinked questions)."""
        return {}


class RecordSource(Sequence[EditRecord]):
    """The records of one parser, checked once and read on access.

    Record ``k`` (0-based over the good records) comes from raw record
    ``raw_index(k)`` (the item's index in its file, the index errors name).
    """

    def __init__(self, parser: Parser, on_error: str = "raise") -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {list(ON_ERROR)}, got {on_error!r}")
        self.parser = parser
        self.on_error = on_error
        self.skipped = 0
        self.skip_reasons: list[str] = []
        self._raw = array("q")  # record k -> raw record index
        self._sub = array("q")  # record k -> its place among that raw record's records
        self._sig = array("q")  # record k -> its language signature
        self._hash = array("q")  # record k -> hash of its id (finds duplicates and ``ids``)
        self.signatures: list[tuple[str, ...]] = []  # language codes of a signature, record order
        self._cache: tuple[int, list[EditRecord]] | None = None
        self._build()

    # ----------------------------------------------------------- the one pass

    def _build(self) -> None:
        self.parser.prepare(self._reject)
        sig_ids: dict[tuple[str, ...], int] = {}
        scans = [f.scan() for f in self.parser.files]
        while True:
            step = [next(scan, None) for scan in scans]
            if all(s is None for s in step):
                break
            if any(s is None for s in step):
                short = self.parser.files[step.index(None)]
                longer = self.parser.files[next(i for i, s in enumerate(step) if s is not None)]
                raise RecordError(
                    f"has fewer records than {longer.path} (the files are read side by side and must align)",
                    source=short.path, index=len(short),
                )
            index = step[0][0]
            items = tuple(value for _, value in step)
            bad = next((v for v in items if isinstance(v, BadItem)), None)
            try:
                if bad is not None:
                    raise bad.error
                records = self.parser.parse(items, index)
            except RecordError as err:
                self._reject(self._with_line(err))
                continue
            for sub, record in enumerate(records):
                signature = tuple(record.languages)
                self._raw.append(index)
                self._sub.append(sub)
                self._sig.append(sig_ids.setdefault(signature, len(sig_ids)))
                self._hash.append(id_hash(record.id))
        self.signatures = list(sig_ids)
        self._drop_duplicates()

    def _with_line(self, err: RecordError) -> RecordError:
        """Add the line where the item starts, when the error names one file and item."""
        if err.line is not None or err.index is None:
            return err
        for f in self.parser.files:
            if f.path == err.source:
                line = f.line_of(err.index)
                return err if line is None else err.replace(line=line)
        return err

    def _reject(self, err: RecordError) -> None:
        if self.on_error == "raise":
            raise err
        self.skipped += 1
        if len(self.skip_reasons) < MAX_REASONS:
            self.skip_reasons.append(str(err))

    def _drop_duplicates(self) -> None:
        """Find repeated ids (the later ones); raise, or drop them when skipping.

        Ids are compared through their hashes (8 bytes a record); only records
        whose hashes collide are read again to compare the ids themselves.
        """
        if len(self) < 2:
            return
        h = self.id_hashes
        order = np.argsort(h, kind="stable")  # equal hashes stay in file order
        same = np.flatnonzero(h[order][1:] == h[order][:-1])
        duplicates: dict[int, int] = {}  # later record -> first record with the same id
        first_of: dict[str, int] = {}
        for j in same:
            for k in (int(order[j]), int(order[j + 1])):
                rid = self[k].id
                first = first_of.setdefault(rid, k)
                if first != k:
                    duplicates[k] = first
        for k in sorted(duplicates):
            first = duplicates[k]
            err = RecordError(
                f"duplicate id (first seen at record #{self._raw[first]})",
                source=self._source_of(k), index=self._raw[k], record_id=self[k].id, field="id",
            )
            self._reject(self._with_line(err))
        if duplicates:
            keep = [k for k in range(len(self._raw)) if k not in duplicates]
            for name in ("_raw", "_sub", "_sig", "_hash"):
                old = getattr(self, name)
                setattr(self, name, array("q", (old[k] for k in keep)))
            self._cache = None

    def _source_of(self, k: int) -> str:
        files = self.parser.files
        return files[0].path if len(files) == 1 else self.parser.name

    # ------------------------------------------------------------- the index

    def __len__(self) -> int:
        return len(self._raw)

    def __getitem__(self, k):  # type: ignore[override]
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(f"record {k} out of range (source has {len(self)})")
        raw = self._raw[k]
        if self._cache is None or self._cache[0] != raw:
            items = tuple(f.load(raw) for f in self.parser.files)
            self._cache = (raw, self.parser.parse(items, raw))
        return self._cache[1][self._sub[k]]

    def __iter__(self) -> Iterator[EditRecord]:
        for k in range(len(self)):
            yield self[k]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = None
        return state

    # Views of the index (no copies), one entry per record.
    @property
    def raw_indices(self) -> np.ndarray:
        """Index, in its file, of the item each record comes from."""
        return np.frombuffer(self._raw, dtype=np.int64) if len(self) else np.zeros(0, np.int64)

    @property
    def signature_indices(self) -> np.ndarray:
        """For each record, its entry in :attr:`signatures` (its language codes)."""
        return np.frombuffer(self._sig, dtype=np.int64) if len(self) else np.zeros(0, np.int64)

    @property
    def id_hashes(self) -> np.ndarray:
        return np.frombuffer(self._hash, dtype=np.int64) if len(self) else np.zeros(0, np.int64)

    def raw_index(self, k: int) -> int:
        """Index, in its file, of the item record ``k`` comes from."""
        return self._raw[k]

    def languages_of(self, k: int) -> tuple[str, ...]:
        """Language codes of record ``k`` (from the index; nothing is read)."""
        return self.signatures[self._sig[k]]

    def source_of(self, k: int) -> str:
        """The file record ``k`` comes from (the folder for multi-file formats)."""
        return self._source_of(k)

    def notes(self) -> dict[str, Any]:
        return self.parser.notes()

    def close(self) -> None:
        for f in self.parser.files:
            f.close()


def skip_summary(skipped: int, reasons: list[str], where: str) -> str:
    """``N bad records skipped (on_error: skip) in <where>:`` and the first reasons, one a line."""
    shown = "\n  ".join(reasons)
    more = "" if skipped <= len(reasons) else f"\n  ... and {skipped - len(reasons)} more"
    return f"{skipped} bad records skipped (on_error: skip) in {where}:\n  {shown}{more}"
