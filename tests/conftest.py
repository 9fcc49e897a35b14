"""Shared fixtures: tiny random models (built from a config, no download)
and, for tests marked ``real_model``, the embedded Gemma 3 270M."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


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
    cfg = GPT2Config(vocab_size=4 + len(WORDS), n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
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
    from mke_lightning.records import record_from_dict

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
    from mke_lightning.records import record_from_dict

    return [record_from_dict(toy_record("toy-1")), record_from_dict(toy_record("toy-2"))]


@pytest.fixture(scope="session")
def real_model():
    """The embedded Gemma 3 270M (converted and cached on first use)."""
    from mke_lightning.model_loading import ModelConfig, load_causal_lm

    return load_causal_lm(ModelConfig())


@pytest.fixture(scope="session")
def mzsre_dir() -> Path:
    folder = SHARED_DATA / "mzsre"
    assert folder.is_dir(), f"MzsRE data not found at {folder} (expected ../shared/data beside the checkout)"
    return folder


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real benchmark files (../shared/data beside the checkout; never copied into the repo)."""
    assert SHARED_DATA.is_dir(), f"benchmark data not found at {SHARED_DATA} (expected ../shared/data beside the checkout)"
    return SHARED_DATA
