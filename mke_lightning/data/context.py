"""Checks that every text a run feeds the model fits in the model's context.

A prompt longer than the model's positions either crashes deep inside the
model (GPT-2's learned position table: ``IndexError``, no record named) or runs
silently past what the model was trained on (rotary models such as Llama).
Both are refused here, before localisation or the first edit, with an error
that names the file, record, language and field. Nothing is truncated.

Each prompt is measured with the longest of its answers (the answer is scored,
or generated, right after it) plus :data:`GENERATION_MARGIN` tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from mke_lightning.data.records import EditRecord, LanguageFacts, RecordError, join_prompt

# Attributes of a Hugging Face config that hold the number of positions, in the order looked up.
CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")

# The evaluation generates up to two tokens past the longest answer (gen_em); counted so that
# generation too stays inside the context.
GENERATION_MARGIN = 2


def model_context(model) -> tuple[int, str] | None:
    """``(positions, attribute)``: how many tokens ``model`` reads, and the config attribute that says
    so; ``None`` when its config names no limit."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text_config = getattr(config, "get_text_config", None)
    for cfg in ([text_config()] if callable(text_config) else []) + [config]:
        for name in CONTEXT_ATTRIBUTES:
            value = getattr(cfg, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value, f"config.{name}"
    return None


def _texts(facts: LanguageFacts) -> Iterable[tuple[str, str, tuple[str, ...]]]:
    """``(field, prompt, answers)`` of every prompt a run reads from one language block."""
    targets = tuple(t for t in (facts.target_new, *facts.target_new_aliases, facts.target_true) if t)
    yield "prompt", facts.prompt, targets
    for i, text in enumerate(facts.paraphrases):
        yield f"paraphrases[{i}]", text, targets
    for kind in ("locality", "portability", "multi_hop"):
        for i, probe in enumerate(getattr(facts, kind)):
            yield f"{kind}[{i}].prompt", probe.prompt, probe.answers


def check_prompt_lengths(
    records: Iterable[tuple[EditRecord, str | None, int | None]],
    languages: Sequence[str],
    tokenizer,
    context: int,
    about: str,
) -> None:
    """Raise :class:`RecordError` at the first prompt that does not fit in ``context`` tokens.

    Args:
        records: ``(record, file, index in the file)`` triples.
        languages: the languages the run reads (those a record lacks are passed over).
        tokenizer: the model's tokenizer (prompts are counted with its special tokens, e.g. BOS).
        context: the model's number of positions.
        about: where the limit comes from, for the message (``"config.n_positions of gpt2"``).
    """
    for record, source, index in records:
        rows = [(lang, name, prompt, answers) for lang in languages if lang in record.languages
                for name, prompt, answers in _texts(record.facts(lang))]
        if not rows:
            continue
        prompt_ids = tokenizer([join_prompt(p, "", lang)[0] for lang, _, p, _ in rows], add_special_tokens=True)[
            "input_ids"
        ]
        answers = [join_prompt("", a, lang)[1] for lang, _, _, ans in rows for a in ans]
        answer_ids = tokenizer(answers, add_special_tokens=False)["input_ids"] if answers else []
        k = 0
        for (lang, name, _, ans), ids in zip(rows, prompt_ids):
            longest = max((len(answer_ids[k + j]) for j in range(len(ans))), default=0)
            k += len(ans)
            total = len(ids) + longest + GENERATION_MARGIN
            if total > context:
                raise RecordError(
                    f"the prompt takes {len(ids)} tokens and its longest answer {longest} (+{GENERATION_MARGIN} for "
                    f"generation): {total} tokens, more than the model's context of {context} ({about}). "
                    "Shorten the text, leave the record out (data.ids, data.offset, data.limit), or use a model "
                    "with a longer context",
                    source=source, index=index, record_id=record.id, field=f"languages.{lang}.{name}",
                )


def reader_of(module, trainer) -> tuple[object, object, object]:
    """``(module, model, tokenizer)`` of the LightningModule that reads the records (``module``, else the
    trainer's), once its model is built; ``None`` for what is not there yet."""
    if module is None and trainer is not None:
        module = getattr(trainer, "lightning_module", None)
    if module is None:
        return None, None, None
    getter = getattr(module, "get_causal_lm", None)
    model = getter() if callable(getter) else getattr(module, "causal_lm", None)
    return module, model, getattr(module, "tokenizer", None)


def _model_name(model) -> str:
    return getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__


def check_run_context(module, model, tokenizer, data, selected: list[int], eval_languages: list[str]) -> None:
    """Every selected record's prompts, with their answers, in the run's languages (the evaluation languages and
    the module's ``train_languages``) fit in ``model``'s context (:class:`RecordError` naming the first that does
    not); nothing to check for a model that states no context length."""
    found = model_context(model)
    if found is None:
        return
    positions, attribute = found
    train = getattr(module, "train_languages", None) or []
    languages = list(dict.fromkeys([*eval_languages, *train]))
    check_prompt_lengths(((data[k], data.source_of(k), data.raw_index(k)) for k in selected),
                         languages, tokenizer, positions, f"{attribute} of {_model_name(model)}")


def check_module_masks(module, model) -> None:
    """Bounds-check the module's neuron masks against its model before the first edit: a mask naming a layer or
    neuron the model lacks is refused here, with its file, not half-way through the run after earlier edits."""
    masks = getattr(module, "neuron_masks", None)
    arch = getattr(module, "arch", None)
    if model is None or arch is None or not masks:
        return
    from mke_lightning.localization.neurons import check_masks

    check_masks(masks.values(), model, arch, f"model {_model_name(model)}")
