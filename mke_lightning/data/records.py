"""The one edit-record schema every dataset adapter produces.

An :class:`EditRecord` is one fact to change, stated in one or more languages.
Each language block (:class:`LanguageFacts`) holds the edit prompt, the old and
new target, paraphrases of the prompt, and the probes used to evaluate the
edit: locality (unrelated prompts whose answer must not move), portability
(questions whose answer follows from the new fact) and multi-hop questions.

Language codes are ISO 639-1 (``en``, ``zh``, ``cs`` ...). Dataset quirks such
as MzsRE's ``cz``/``du`` are mapped by the adapters, never here.

Some benchmarks group edits: an MQuAKE case is several edits that only make
its multi-hop questions true together. Such records share a ``case``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

# Languages written without spaces between words: a target is appended to its
# prompt with no separator in these, with one space everywhere else.
NO_SPACE_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "km", "my"})

# The 183 two-letter codes of ISO 639-1 (the deprecated "bh" and "sh" left out).
ISO_639_1 = frozenset(
    """aa ab ae af ak am an ar as av ay az ba be bg bi bm bn bo br bs ca ce ch co cr cs cu cv cy
    da de dv dz ee el en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho hr ht hu
    hy hz ia id ie ig ii ik io is it iu ja jv ka kg ki kj kk kl km kn ko kr ks ku kv kw ky la lb
    lg li ln lo lt lu lv mg mh mi mk ml mn mr ms mt my na nb nd ne ng nl nn no nr nv ny oc oj om
    or os pa pi pl ps pt qu rm rn ro ru rw sa sc sd se sg si sk sl sm sn so sq sr ss st su sv sw
    ta te tg th ti tk tl tn to tr ts tt tw ty ug uk ur uz ve vi vo wa wo xh yi yo za zh zu""".split()
)


class RecordError(ValueError):
    """Bad input: names the file, the record (index and id) and the field."""

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        index: int | None = None,
        record_id: str | None = None,
        field: str | None = None,
        line: int | None = None,
    ) -> None:
        self.source = source
        self.index = index
        self.record_id = record_id
        self.field = field
        self.line = line
        self.reason = message
        where = []
        if source is not None:
            where.append(f"file {source}")
        if index is not None:
            where.append(f"record #{index}")
        if record_id is not None:
            where.append(f"id {record_id!r}")
        if field is not None:
            where.append(f"field {field!r}")
        prefix = ", ".join(where)
        if line is not None:
            message = f"{message} (line {line})"
        super().__init__(f"{prefix}: {message}" if prefix else message)

    def __reduce__(self):  # keyword arguments survive pickling (DataLoader workers, DDP spawn)
        return _rebuild_error, (self.reason, self.source, self.index, self.record_id, self.field, self.line)

    def replace(self, **changes: Any) -> "RecordError":
        """The same error with some of its parts changed (e.g. ``line=3``)."""
        parts = dict(source=self.source, index=self.index, record_id=self.record_id, field=self.field, line=self.line)
        parts.update(changes)
        return RecordError(self.reason, **parts)


def _rebuild_error(reason, source, index, record_id, field, line) -> RecordError:
    return RecordError(reason, source=source, index=index, record_id=record_id, field=field, line=line)


@dataclass(frozen=True)
class Probe:
    """A prompt (or question) with its expected answer and accepted aliases."""

    prompt: str
    answer: str
    aliases: tuple[str, ...] = ()

    @property
    def answers(self) -> tuple[str, ...]:
        """The answer followed by its aliases, without duplicates."""
        return tuple(dict.fromkeys((self.answer, *self.aliases)))


@dataclass(frozen=True)
class LanguageFacts:
    """One fact to edit, stated in one language.

    ``subject`` is ``None`` only where a benchmark does not name it (MLaKE).
    ``target_new_aliases`` are other accepted spellings of the new target.
    """

    subject: str | None
    prompt: str
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()
    locality: tuple[Probe, ...] = ()
    portability: tuple[Probe, ...] = ()
    multi_hop: tuple[Probe, ...] = ()
    target_new_aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class EditRecord:
    """One edit: a record id and the fact in each of its languages.

    ``case`` names the group of edits this one belongs to (MQuAKE: the edits
    of one case); ``None`` for a stand-alone edit.
    """

    id: str
    languages: Mapping[str, LanguageFacts] = field(default_factory=dict)
    case: str | None = None

    def facts(self, lang: str) -> LanguageFacts:
        try:
            return self.languages[lang]
        except KeyError:
            raise RecordError(
                f"language {lang!r} is missing (record has {sorted(self.languages)})",
                record_id=self.id,
                field=f"languages.{lang}",
            ) from None

    def to_dict(self) -> dict[str, Any]:
        """The native JSONL form of this record (inverse of :func:`record_from_dict`)."""
        out: dict[str, Any] = {"id": self.id, "languages": {}}
        if self.case is not None:
            out["case"] = self.case
        for lang, facts in self.languages.items():
            block = asdict(facts)
            for key in ("paraphrases", "target_new_aliases"):
                block[key] = list(block[key])
            for key in ("locality", "portability", "multi_hop"):
                block[key] = [
                    {"prompt": p["prompt"], "answer": p["answer"], "aliases": list(p["aliases"])}
                    for p in block[key]
                ]
            for key in ("subject", "target_true"):
                if block[key] is None:
                    del block[key]
            if not block["target_new_aliases"]:
                del block["target_new_aliases"]
            out["languages"][lang] = block
        return out


def join_prompt(prompt: str, target: str, lang: str) -> tuple[str, str]:
    """Split ``prompt + target`` into (prompt, continuation) for ``lang``.

    The continuation carries the separator (a space, or nothing for scripts
    without word spaces) so that tokenising the two parts separately gives the
    same tokens a user's prompt would.
    """
    prompt = prompt.rstrip()
    sep = "" if lang in NO_SPACE_LANGUAGES else " "
    return prompt, sep + target.strip()


# --------------------------------------------------------------------------
# Parsing the native (JSONL) form, with errors that name file/record/field.
# --------------------------------------------------------------------------


class _Ctx:
    """Where a value came from, to build :class:`RecordError` messages."""

    def __init__(self, source: str | None, index: int | None, record_id: str | None):
        self.source, self.index, self.record_id = source, index, record_id

    def error(self, field_name: str, message: str) -> RecordError:
        return RecordError(
            message, source=self.source, index=self.index, record_id=self.record_id, field=field_name
        )


def _text(ctx: _Ctx, obj: Mapping[str, Any], key: str, path: str, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise ctx.error(f"{path}.{key}", "is missing")
        return None
    if not isinstance(value, str):
        raise ctx.error(f"{path}.{key}", f"must be a string, got {type(value).__name__}")
    if not value.strip():
        if required:
            raise ctx.error(f"{path}.{key}", "is empty")
        return None
    return value.strip()


def _texts(ctx: _Ctx, obj: Mapping[str, Any], key: str, path: str) -> tuple[str, ...]:
    value = obj.get(key, [])
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ctx.error(f"{path}.{key}", f"must be a list of strings, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise ctx.error(f"{path}.{key}[{i}]", "must be a non-empty string")
        out.append(item.strip())
    return tuple(out)


def _probes(ctx: _Ctx, obj: Mapping[str, Any], key: str, path: str) -> tuple[Probe, ...]:
    value = obj.get(key, [])
    if value is None:
        return ()
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list):
        raise ctx.error(f"{path}.{key}", f"must be a list of objects, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        here = f"{path}.{key}[{i}]"
        if not isinstance(item, Mapping):
            raise ctx.error(here, f"must be an object with 'prompt' and 'answer', got {type(item).__name__}")
        prompt = _text(ctx, item, "prompt", here)
        answer = _text(ctx, item, "answer", here)
        aliases = _texts(ctx, item, "aliases", here)
        out.append(Probe(prompt=prompt, answer=answer, aliases=aliases))
    return tuple(out)


def language_facts_from_dict(
    obj: Any, *, lang: str, source: str | None = None, index: int | None = None, record_id: str | None = None
) -> LanguageFacts:
    """Parse one language block; raises :class:`RecordError` on bad input."""
    ctx = _Ctx(source, index, record_id)
    path = f"languages.{lang}"
    if not isinstance(obj, Mapping):
        raise ctx.error(path, f"must be an object, got {type(obj).__name__}")
    return LanguageFacts(
        subject=_text(ctx, obj, "subject", path, required=False),
        prompt=_text(ctx, obj, "prompt", path),
        target_new=_text(ctx, obj, "target_new", path),
        target_true=_text(ctx, obj, "target_true", path, required=False),
        paraphrases=_texts(ctx, obj, "paraphrases", path),
        locality=_probes(ctx, obj, "locality", path),
        portability=_probes(ctx, obj, "portability", path),
        multi_hop=_probes(ctx, obj, "multi_hop", path),
        target_new_aliases=_texts(ctx, obj, "target_new_aliases", path),
    )


def is_language_code(code: Any) -> bool:
    """True for an ISO 639-1 code (``"en"``, ``"cs"``; not ``"EN"``, ``"cz"``, ``"eng"``)."""
    return isinstance(code, str) and code in ISO_639_1


def check_language_code(code: Any, ctx_field: str, ctx: _Ctx) -> str:
    if not is_language_code(code):
        raise ctx.error(
            ctx_field, f"language code {code!r} is not an ISO 639-1 code (two lower-case letters, e.g. 'en', 'cs')"
        )
    return code


def _json_kind(value: Any) -> str:
    """How a decoded JSON value reads in the file (``null``, ``true``, ``a number 1.5``, ``an object``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"the number {value!r}"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def id_problem(obj: Mapping[str, Any], key: str) -> str | None:
    """What is wrong with ``obj[key]`` as a record id (a non-empty string or an integer), or ``None``."""
    if key not in obj:
        return f"is missing: give each record a unique '{key}' (a string or an integer)"
    value = obj[key]
    if isinstance(value, str):
        return None if value.strip() else f"is empty: give each record a unique '{key}' (a string or an integer)"
    if isinstance(value, int) and not isinstance(value, bool):
        return None
    return f"must be a string or an integer, got {_json_kind(value)}: write it as e.g. \"r1\" or 1"


def record_from_dict(obj: Any, *, source: str | None = None, index: int | None = None) -> EditRecord:
    """Parse one native record (see docs/data.md); raises :class:`RecordError`."""
    ctx = _Ctx(source, index, None)
    if not isinstance(obj, Mapping):
        raise ctx.error("<record>", f"must be a JSON object, got {type(obj).__name__}")
    problem = id_problem(obj, "id")
    if problem is not None:
        raise ctx.error("id", problem)
    rid = str(obj["id"]).strip()
    ctx.record_id = rid
    case = obj.get("case")
    if case is not None and (not isinstance(case, str) or not case.strip()):
        raise ctx.error("case", "must be a non-empty string when given")
    langs = obj.get("languages")
    if not isinstance(langs, Mapping) or not langs:
        raise ctx.error("languages", "must be a non-empty object mapping language codes to facts")
    blocks = {}
    for code, block in langs.items():
        check_language_code(code, f"languages.{code}", ctx)
        blocks[code] = language_facts_from_dict(block, lang=code, source=source, index=index, record_id=rid)
    return EditRecord(id=rid, languages=blocks, case=None if case is None else case.strip())
