"""Small checked getters the adapters share: each failure is a :class:`RecordError`
naming the file, the record (index and, once known, id) and the field as the
benchmark writes it (``en.alt``, ``requested_rewrite[2].prompt``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mke_lightning.data.records import RecordError, id_problem, is_language_code

# The zsRE-family English locality questions keep the Natural Questions task
# prefix ("nq question: who sang ..."); translations dropped it. Stripped so
# that every language gets the bare question.
NQ_PREFIX = "nq question: "


@dataclass
class Where:
    """The file and record a value is read from."""

    source: str
    index: int
    record_id: str | None = None

    def error(self, field: str, message: str) -> RecordError:
        return RecordError(message, source=self.source, index=self.index, record_id=self.record_id, field=field)

    def identifier(self, item: dict[str, Any], field: str) -> str:
        """A record's own id field (a non-empty string or an integer), stripped."""
        problem = id_problem(item, field)
        if problem is not None:
            raise self.error(field, problem)
        return str(item[field]).strip()

    def obj(self, value: Any, field: str) -> dict[str, Any]:
        """``value`` as a JSON object."""
        if not isinstance(value, dict):
            what = "is missing" if value is None else f"must be an object, got {type(value).__name__}"
            raise self.error(field, what)
        return value

    def member(self, parent: dict[str, Any], key: str, path: str) -> dict[str, Any]:
        """``parent[key]`` as a JSON object."""
        return self.obj(parent.get(key), _join(path, key))

    def text(self, parent: dict[str, Any], key: str, path: str, required: bool = True) -> str | None:
        """``parent[key]`` as a stripped non-empty string (``None`` if optional and absent)."""
        field = _join(path, key)
        value = parent.get(key)
        if value is None:
            if required:
                raise self.error(field, "is missing")
            return None
        if not isinstance(value, str):
            raise self.error(field, f"must be a string, got {type(value).__name__}")
        if not value.strip():
            raise self.error(field, "is empty")
        return value.strip()

    def texts(self, parent: dict[str, Any], key: str, path: str, required: bool = False) -> tuple[str, ...]:
        """``parent[key]`` as a list of non-empty strings (``()`` if optional and absent)."""
        field = _join(path, key)
        value = parent.get(key)
        if value is None:
            if required:
                raise self.error(field, "is missing")
            return ()
        return self.text_list(value, field)

    def text_list(self, value: Any, field: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self.error(field, f"must be a list of strings, got {type(value).__name__}")
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                raise self.error(f"{field}[{i}]", "must be a non-empty string")
            out.append(item.strip())
        return tuple(out)

    def language(self, code: Any, field: str) -> str:
        if not is_language_code(code):
            raise self.error(
                field, f"language code {code!r} is not an ISO 639-1 code (two lower-case letters, e.g. 'en')"
            )
        return code

    def fill_subject(self, template: str, subject: str, field: str) -> str:
        """A prompt template with its ``{}`` subject slot filled."""
        if "{}" not in template:
            raise self.error(field, f"has no '{{}}' slot for the subject ({template!r})")
        return template.replace("{}", subject)


def strip_nq_prefix(where: Where, question: str, field: str) -> str:
    if not question.startswith(NQ_PREFIX):
        return question
    bare = question[len(NQ_PREFIX):].strip()
    if not bare:
        raise where.error(field, f"is empty after the {NQ_PREFIX.strip()!r} prefix")
    return bare


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
