"""Masked editing on tiny random models (CPU, seconds); localisation tests live in test_localization*.py."""

from __future__ import annotations

import pytest
import torch

from mke_lightning.editing.editor import EditLossConfig, KnowledgeEditor
from mke_lightning.editing.masked_lora import LoRAConfig, attach
from mke_lightning.localization.attribution import AttributionConfig
from mke_lightning.localization.locate import LocalizationConfig, locate
from mke_lightning.localization.neurons import NeuronMask
from mke_lightning.modeling.architectures import UnknownArchitectureError, mlp_out_modules, neuron_dim, resolve_arch
from mke_lightning.modeling.loading import ModelConfig, load_causal_lm


def _editor(folder, **loss) -> KnowledgeEditor:
    ed = KnowledgeEditor(
        lm=ModelConfig(name_or_path=str(folder)), loss=EditLossConfig(**loss), lora=LoRAConfig(merge_scale=1.0)
    )
    ed.configure_model()
    return ed


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


LOC = LocalizationConfig(attribution=AttributionConfig(steps=5), cross_languages=["en", "fr"], threshold=0.3)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_masked_edit_changes_only_located_value_vectors_and_restores_exactly(fixture, request, toy_records):
    ed = _editor(request.getfixturevalue(fixture), max_steps=5, stop_prob=1.1, stop_loss=0.0)
    model, record = ed.causal_lm, toy_records[0]
    mask = locate(model, ed.tokenizer, ed.arch, record, "en", LOC)
    assert mask.count() > 0
    before = _snapshot(model)
    outcome = ed.edit(record, mask)
    assert outcome.steps == 5
    after = _snapshot(model)
    assert set(after) == set(before)  # adapters are gone after the merge

    union = mask.union()
    out_names = {ed.arch.mlp_out_name(l) + ".weight": l for l in range(len(mlp_out_modules(model, ed.arch)))}
    changed_any = False
    for name, w0 in before.items():
        w1 = after[name]
        if name not in out_names:
            assert torch.equal(w0, w1), f"{name} changed but is not an output projection"
            continue
        dim = neuron_dim(model.get_submodule(name[: -len(".weight")]))
        diff = (w1 - w0).abs().sum(dim=1 - dim)  # per neuron
        located = torch.zeros_like(diff, dtype=torch.bool)
        located[union.get(out_names[name], [])] = True
        assert torch.all(diff[~located] == 0), f"{name}: a neuron outside the mask changed"
        changed_any |= bool(diff[located].sum() > 0)
    assert changed_any, "the edit changed nothing"

    ed.restore()
    for name, w0 in before.items():
        assert torch.equal(w0, model.state_dict()[name]), f"{name} not restored bit for bit"


def test_adapter_ranks_and_gradient_mask(tiny_llama_dir):
    model, tok, arch = load_causal_lm(ModelConfig(name_or_path=str(tiny_llama_dir)))
    mask = NeuronMask("m", {"independent": {0: [1, 5]}, "specific": {0: [7], 1: [2, 3, 4]}})
    handle = attach(model, arch, mask, LoRAConfig(rank_factor=4))
    lay0 = model.get_submodule(arch.mlp_out_name(0))
    lay1 = model.get_submodule(arch.mlp_out_name(1))
    assert lay0.lora_A["independent"].weight.shape[0] == 8
    assert lay0.lora_A["specific"].weight.shape[0] == 4
    assert lay1.lora_A["specific"].weight.shape[0] == 12
    assert "independent" not in lay1.lora_A
    a = lay1.lora_A["specific"].weight
    outside = torch.ones(a.shape[1], dtype=torch.bool)
    outside[[2, 3, 4]] = False
    assert torch.all(a[:, outside] == 0)
    with torch.no_grad():  # B starts at zero, which would zero A's gradient too
        lay1.lora_B["specific"].weight.normal_()
    ids = torch.tensor([tok("the capital of france is")["input_ids"]])
    model(input_ids=ids).logits.sum().backward()
    assert torch.all(a.grad[:, outside] == 0)
    assert a.grad[:, ~outside].abs().sum() > 0
    handle.discard()
    assert not hasattr(model.get_submodule(arch.mlp_out_name(0)), "lora_A")


def test_edit_moves_the_answer_on_a_tiny_model(tiny_llama_dir, toy_records):
    from mke_lightning.evaluation.evaluator import EditEvaluator, build_items

    ed = _editor(tiny_llama_dir, max_steps=60)
    ed.optimizer_factory = lambda p: torch.optim.Adam(p, lr=0.2)
    record = toy_records[0]
    mask = locate(ed.causal_lm, ed.tokenizer, ed.arch, record, "en", LOC)
    ev = EditEvaluator(ed.tokenizer)
    items = build_items(record, ["en"])
    refs = ev.references(ed.causal_lm, items)
    pre = {r["measure"]: r for r in ev.score(ed.causal_lm, items, refs)}
    outcome = ed.edit(record, mask)
    post = {r["measure"]: r for r in ev.score(ed.causal_lm, items, refs)}
    assert pre["reliability"]["token_acc"] == 0.0
    assert outcome.steps >= 1
    assert post["reliability"]["token_acc"] == 1.0


def test_unknown_architecture_names_type_and_override():
    with pytest.raises(UnknownArchitectureError) as err:
        resolve_arch("mamba_like")
    assert "mamba_like" in str(err.value) and "mlp_out" in str(err.value)
    spec = resolve_arch("mamba_like", {"layers": "backbone.blocks", "mlp_out": "ffn.out"})
    assert spec.mlp_out_name(3) == "backbone.blocks.3.ffn.out"
    assert resolve_arch("llama", {"mlp_out": "mlp.w2"}).mlp_out_name(0) == "model.layers.0.mlp.w2"
    for family in ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gpt2", "bloom", "gpt_neox"]:
        assert resolve_arch(family).mlp_out
    with pytest.raises(ValueError, match="unknown keys"):
        resolve_arch("llama", {"mlp": "x"})


def test_trust_remote_code_is_off_by_default():
    assert ModelConfig().trust_remote_code is False
    with pytest.raises(ValueError, match="dtype"):
        ModelConfig(dtype="float8")
