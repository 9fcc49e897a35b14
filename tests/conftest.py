"""Shared fixtures: tiny random models (built from a config, no download)
and, for tests marked ``real_model``, the embedded Gemma 3 270M."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED_DATA = REPO.parent / "shared" / "data"
DATA_DIR_VARIABLE = "MKE_DATA_DIR"  # where the benchmark files are, when not ../shared/data
REQUIRE_DATA_VARIABLE = "MKE_REQUIRE_DATA"  # "1": a test whose benchmark files are missing fails, not skips


def _shared_data_dir() -> Path:
    """The benchmark folder: $MKE_DATA_DIR if set, else ../shared/data beside the checkout."""
    chosen = os.environ.get(DATA_DIR_VARIABLE, "").strip()
    return Path(chosen).expanduser().resolve() if chosen else DEFAULT_SHARED_DATA


SHARED_DATA = _shared_data_dir()
BENCHMARKS = ("mzsre", "bi-zsre", "mlake", "mquake", "zsre")  # the folders the data tests read


def _data_required() -> bool:
    return os.environ.get(REQUIRE_DATA_VARIABLE, "").strip().lower() in {"1", "true", "yes", "on"}


def require_data(relative: str = "") -> Path:
    """The benchmark path ``SHARED_DATA / relative``; skips the calling test when it is absent
    (fails instead when $MKE_REQUIRE_DATA=1, as CI sets it), with a reason naming where it looked."""
    path = SHARED_DATA / relative if relative else SHARED_DATA
    if path.exists():
        return path
    if os.environ.get(DATA_DIR_VARIABLE, "").strip():
        where = (f"${DATA_DIR_VARIABLE} is {os.environ[DATA_DIR_VARIABLE]}; unset, the tests look in ../shared/data "
                 "beside the checkout")
    else:
        where = (f"${DATA_DIR_VARIABLE} is unset, so the tests look in ../shared/data beside the checkout; "
                 f"set it to the folder holding {', '.join(BENCHMARKS)}")
    reason = f"benchmark data not found at {path} ({where})"
    if _data_required():
        pytest.fail(f"{reason}; ${REQUIRE_DATA_VARIABLE}=1 makes missing benchmark data a failure", pytrace=False)
    pytest.skip(reason)


def _tokenizer_files(folder: Path, vocab_words: list[str]) -> None:
    """A word-level tokenizer (whitespace split) saved as tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *vocab_words])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)


WORDS = (
    "the capital of france is paris rome berlin madrid tower city located in country italy spain germany "
    "la capitale de est ville tour die hauptstadt von ist stadt turm honey made by bees sky blue what colour "
    "le ciel bleu der himmel blau"
).split()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama with a word-level tokenizer, saved as an HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    _tokenizer_files(folder, WORDS)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=4 + len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A 2-layer random GPT-2 (Conv1D projections) with the same tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    _tokenizer_files(folder, WORDS)
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=4 + len(WORDS), n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
    )
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    return folder


def toy_record(rid: str = "toy-1") -> dict:
    """A record in the tiny tokenizer's vocabulary (native JSONL form)."""

    def block(prompt, para, new, true, loc, loc_a, port, port_a):
        return {
            "subject": "tower", "prompt": prompt, "target_new": new, "target_true": true, "paraphrases": [para],
            "locality": [{"prompt": loc, "answer": loc_a}], "portability": [{"prompt": port, "answer": port_a}],
        }

    return {
        "id": rid,
        "languages": {
            "en": block("the tower is located in the city of", "the city of the tower is", "rome", "paris",
                        "honey is made by", "bees", "the tower is located in the country", "italy"),
            "fr": block("la tour est de la ville", "la ville de la tour est", "rome", "paris",
                        "le ciel est", "bleu", "la tour est de", "italy"),
            "de": block("der turm ist stadt", "die stadt von der turm ist", "rome", "paris",
                        "der himmel ist", "blau", "der turm ist von", "italy"),
        },
    }


def two_fact_records():
    """Records ``a`` and ``b``: two different facts (prompts and answers) in the tiny vocabulary."""
    from mke_lightning.data.records import record_from_dict

    a = toy_record("a")
    b = toy_record("b")
    b["languages"]["en"].update(prompt="the capital of france is", paraphrases=["the capital city of france is"],
                                target_new="berlin", target_true="paris")
    return [record_from_dict(r, source="toy.jsonl", index=i) for i, r in enumerate([a, b])]


def out_projection_changes(editor, before: dict) -> dict:
    """Per layer, the change of the MLP output projection's weight against ``before`` (a state dict);
    fails if any other weight changed."""
    out = {}
    n_layers = len(editor.causal_lm.get_submodule(editor.arch.layers))
    for name, w in editor.causal_lm.state_dict().items():
        if torch.equal(w, before[name]):
            continue
        layer = next((l for l in range(n_layers) if name == editor.arch.mlp_out_name(l) + ".weight"), None)
        assert layer is not None, f"{name} changed outside the MLP output projections"
        out[layer] = w - before[name]
    return out


@pytest.fixture()
def toy_records():
    from mke_lightning.data.records import record_from_dict

    return [record_from_dict(toy_record("toy-1")), record_from_dict(toy_record("toy-2"))]


@pytest.fixture(scope="session")
def real_model():
    """The embedded Gemma 3 270M (converted and cached on first use)."""
    from mke_lightning.modeling.loading import ModelConfig, load_causal_lm

    return load_causal_lm(ModelConfig())


@pytest.fixture(scope="session")
def mzsre_dir() -> Path:
    """The MzsRE benchmark folder (skips the test when absent, see ``require_data``)."""
    return require_data("mzsre")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real benchmark files ($MKE_DATA_DIR, else ../shared/data beside the checkout; never copied
    into the repo). Skips the test when absent, see ``require_data``."""
    for benchmark in BENCHMARKS:
        require_data(benchmark)
    return SHARED_DATA
