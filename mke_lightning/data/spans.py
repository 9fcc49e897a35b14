"""Read a benchmark file one item at a time, remembering where each item lies.

Two layouts are read: JSON Lines (one item per non-blank line) and a JSON
array (``[item, item, ...]``, on one line or pretty-printed). :meth:`ItemFile.scan`
yields the items in order and notes each one's byte span and first line, so
that :meth:`ItemFile.load` can read item ``i`` again later with one seek. The
whole file is never held in memory: scanning keeps one chunk of text plus the
item being decoded, and the index costs 24 bytes per item.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from array import array
from typing import Any, BinaryIO, Iterator

from mke_lightning.data.records import RecordError

CHUNK = 1 << 20  # bytes read at a time while scanning a JSON array
_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark some editors write
_SPACE = re.compile(r"[ \t\r\n]*")
_AFTER_NUMBER = frozenset(",] \t\r\n")
_CUT_MARGIN = 16  # characters: longer than any JSON token that can be cut (an escaped surrogate pair is 12)


class BadItem:
    """An item that could not be decoded but does not stop the scan (a bad JSONL line)."""

    __slots__ = ("error",)

    def __init__(self, error: RecordError) -> None:
        self.error = error


class ItemFile:
    """One JSONL or JSON-array file, with the byte span of every item once scanned.

    Args:
        path: the file.
        layout: ``"jsonl"`` or ``"array"``.
    """

    def __init__(self, path: str | os.PathLike[str], layout: str) -> None:
        if layout not in ("jsonl", "array"):
            raise ValueError(f"layout must be 'jsonl' or 'array', got {layout!r}")
        self.path = os.fspath(path)
        self.layout = layout
        self.starts = array("q")  # byte offset where item i starts
        self.ends = array("q")  # byte offset just past item i
        self.lines = array("q")  # 1-based line on which item i starts
        self._fh: BinaryIO | None = None

    def __len__(self) -> int:
        return len(self.starts)

    def __repr__(self) -> str:
        return f"ItemFile({self.path!r}, {self.layout!r}, items={len(self)})"

    # An open handle is per process: it is dropped when pickled (DataLoader
    # workers, DDP spawn) and reopened on the next load.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fh"] = None
        return state

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        fh, self._fh = getattr(self, "_fh", None), None
        if fh is not None:
            fh.close()

    def line_of(self, index: int) -> int | None:
        return self.lines[index] if 0 <= index < len(self.lines) else None

    # ----------------------------------------------------------------- reading

    def load(self, index: int) -> Any:
        """Decode item ``index`` again (after :meth:`scan`)."""
        if self._fh is None:
            self._fh = open(self.path, "rb")
        self._fh.seek(self.starts[index])
        raw = self._fh.read(self.ends[index] - self.starts[index])
        return json.loads(raw.decode("utf-8"))

    def scan(self) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, item)`` for every item, filling the span index.

        A JSONL line that is not valid UTF-8 or JSON comes as a :class:`BadItem`
        (the next line can still be read); a JSON array that is broken raises
        :class:`RecordError`, since nothing after the fault can be located.
        """
        self.starts, self.ends, self.lines = array("q"), array("q"), array("q")
        if not os.path.isfile(self.path):
            raise RecordError("file not found", source=self.path)
        if self.layout == "jsonl":
            return self._scan_lines()
        return self._scan_array()

    def _add(self, start: int, end: int, line: int) -> int:
        self.starts.append(start)
        self.ends.append(end)
        self.lines.append(line)
        return len(self.starts) - 1

    def _scan_lines(self) -> Iterator[tuple[int, Any]]:
        with open(self.path, "rb") as fh:
            offset = 0
            for lineno, raw in enumerate(fh, start=1):
                start, offset = offset, offset + len(raw)
                if lineno == 1 and raw.startswith(_BOM):
                    raw, start = raw[len(_BOM):], start + len(_BOM)
                if not raw.strip():
                    continue  # blank lines are not records
                index = self._add(start, offset, lineno)
                yield index, _decode_line(raw, self.path, index, lineno, start)

    def _scan_array(self) -> Iterator[tuple[int, Any]]:
        with open(self.path, "rb") as fh:
            cur = _Cursor(fh, self.path)
            cur.fill()
            if cur.text.startswith("\ufeff"):
                cur.advance(1)
            if cur.peek() != "[":
                raise RecordError("must be a JSON list of records (it does not start with '[')", source=self.path)
            cur.advance(cur.pos + 1)
            if cur.peek() == "]":
                cur.advance(cur.pos + 1)
            else:
                while True:
                    index = len(self.starts)
                    cur.item = index  # a bad byte met from here on lies in this record
                    cur.peek()  # to the item's first character
                    start, line = cur.byte, cur.line
                    value = cur.value(index)
                    self._add(start, cur.byte, line)
                    cur.item = index + 1  # between records: name the one that follows
                    yield index, value
                    nxt = cur.peek()
                    if nxt == ",":
                        cur.advance(cur.pos + 1)
                        continue
                    if nxt == "]":
                        cur.advance(cur.pos + 1)
                        break
                    raise cur.error(
                        "expected ',' or ']' after a record" if nxt else "the list is not closed", index + 1
                    )
            if cur.peek():
                raise cur.error("extra data after the closing ']'", None)


def _decode_line(raw: bytes, source: str, index: int, lineno: int, start: int) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return BadItem(RecordError(_bad_utf8(exc, start + exc.start, f"offset {exc.start} within the line"),
                                   source=source, index=index, line=lineno))
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        return BadItem(
            RecordError(f"invalid JSON at line {lineno}, column {exc.colno}: {exc.msg}", source=source, index=index)
        )


def _bad_utf8(exc: UnicodeDecodeError, offset: int, detail: str) -> str:
    bad = exc.object[exc.start:exc.end]
    return (f"not valid UTF-8 at byte offset {offset} ({detail}): byte {bad.hex(' ')} ({exc.reason}); "
            "save the file as UTF-8 (e.g. iconv -f <its encoding> -t UTF-8)")


class _Cursor:
    """Decoded text of a file read chunk by chunk, with the byte, line and
    column of the read position ``pos`` kept up to date."""

    def __init__(self, fh: BinaryIO, source: str) -> None:
        self.fh, self.source = fh, source
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.text = ""  # decoded text from some point before ``pos`` on
        self.pos = 0  # read position in ``text``
        self.byte = 0  # byte offset of text[pos] in the file
        self.line = 1  # line of text[pos]
        self.char = 0  # character offset of text[pos] in the file
        self.line_char = 0  # character offset where the current line starts
        self.eof = False
        self.read = 0  # bytes read from the file so far
        self.item: int | None = None  # the record being read (named when a bad byte is met)
        self.bad: RecordError | None = None  # an invalid byte ahead: raised once the text before it is used up

    def fill(self) -> bool:
        """Append the next chunk; False at the end of the file."""
        if self.bad is not None:
            # The text before the bad byte is used up: the record being read holds it.
            raise self.bad.replace(index=self.item, line=self.line + self.text.count("\n", self.pos))
        if self.eof:
            return False
        pending = self.decoder.getstate()[0]  # the start of a character cut by the previous chunk
        chunk = self.fh.read(CHUNK)
        start, self.read = self.read - len(pending), self.read + len(chunk)
        self.eof = not chunk
        try:
            more = self.decoder.decode(chunk, final=self.eof)
        except UnicodeDecodeError as exc:
            # Keep the good text before the bad byte, so that scanning goes on up to it and
            # the error can name the record it falls in (``exc.object`` is ``pending + chunk``).
            more = exc.object[:exc.start].decode("utf-8")
            self.bad = RecordError(
                _bad_utf8(exc, start + exc.start, "counted from 0 at the start of the file"), source=self.source
            )
            self.eof = True
        if self.pos > CHUNK:  # drop text already read, so the buffer stays about one chunk
            self.text, self.pos = self.text[self.pos:], 0
        self.text += more
        return bool(chunk)

    def advance(self, end: int) -> None:
        part = self.text[self.pos:end]
        self.byte += len(part.encode("utf-8"))
        newlines = part.count("\n")
        if newlines:
            self.line += newlines
            self.line_char = self.char + part.rfind("\n") + 1
        self.char += len(part)
        self.pos = end

    def peek(self) -> str:
        """The next character that is not white space ('' at the end of the file)."""
        while True:
            self.advance(_SPACE.match(self.text, self.pos).end())
            if self.pos < len(self.text) or not self.fill():
                return self.text[self.pos:self.pos + 1]

    def value(self, index: int) -> Any:
        """Decode the JSON value at ``pos`` and move past it."""
        decoder = json.JSONDecoder()
        if not self.peek():
            raise self.error("the list is not closed", index)
        while True:
            try:
                value, end = decoder.raw_decode(self.text, self.pos)
            except json.JSONDecodeError as exc:
                # A fault within the last few characters read (a cut "\u00e9"
                # escape, "1." ...) or an open string may just be the chunk end:
                # read on and retry. Elsewhere, the fault is in the file.
                cut_short = exc.pos >= len(self.text) - _CUT_MARGIN or exc.msg.startswith("Unterminated string")
                if cut_short and self.fill():
                    continue
                raise self.error(exc.msg, index, at=exc.pos) from None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                # A number cut by the chunk end ("1e" + "5") decodes short: read on.
                if (end == len(self.text) or self.text[end] not in _AFTER_NUMBER) and self.fill():
                    continue
            self.advance(end)
            return value

    def error(self, message: str, index: int | None, at: int | None = None) -> RecordError:
        at = self.pos if at is None else at
        ahead = self.text[self.pos:at]
        line = self.line + ahead.count("\n")
        nl = ahead.rfind("\n")
        line_start = self.char + nl + 1 if nl >= 0 else self.line_char
        column = self.char + len(ahead) - line_start + 1
        return RecordError(f"invalid JSON at line {line}, column {column}: {message}", source=self.source, index=index)
