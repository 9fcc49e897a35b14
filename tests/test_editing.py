"""Localisation and masked editing on tiny random models (CPU, seconds)."""

from __future__ import annotations

import pytest
import torch

from mke_lightning.architectures import UnknownArchitectureError, mlp_out_modules, neuron_dim, resolve_arch
from mke_lightning.attribution import AttributionConfig, attribute_rows, last_position_patch
from mke_lightning.editor import EditLossConfig, KnowledgeEditor
from mke_lightning.localization import LocalizationConfig, locate
from mke_lightning.masked_lora import LoRAConfig, attach
from mke_lightning.model_loading import ModelConfig, load_causal_lm
from mke_lightning.neurons import NeuronMask


def _editor(folder, **loss) -> KnowledgeEditor:
    ed = KnowledgeEditor(lm=ModelConfig(name_or_path=str(folder)), loss=EditLossConfig(**loss), lora=LoRAConfig(merge_scale=1.0))
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


def test_localisation_leaves_model_unchanged_and_is_deterministic(tiny_llama_dir, toy_records):
    model, tok, arch = load_causal_lm(ModelConfig(name_or_path=str(tiny_llama_dir)))
    before = _snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    m1 = locate(model, tok, arch, toy_records[0], "en", LOC)
    m2 = locate(model, tok, arch, toy_records[0], "en", LOC)
    assert m1.layers == m2.layers
    for name, w in model.state_dict().items():
        assert torch.equal(before[name], w)
    assert all(p.grad is None for p in model.parameters())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


def _reference_ig(model, arch, row, target, steps, per_layer: bool) -> torch.Tensor:
    """A plain loop: one forward/backward per (layer,) step, zero baseline."""
    modules = mlp_out_modules(model, arch)
    ids = torch.tensor([row])
    clean = {}
    with torch.no_grad(), last_position_patch(modules, lambda l, x: clean.__setitem__(l, x.detach().clone())):
        model(input_ids=ids)
    n_layers = len(modules)
    scores = torch.zeros(n_layers, clean[0].shape[-1])
    for layer_set in ([[l] for l in range(n_layers)] if per_layer else [list(range(n_layers))]):
        for k in range(1, steps + 1):
            leaves = {l: (clean[l] * k / steps).requires_grad_(True) for l in layer_set}
            with last_position_patch(modules, lambda l, x: leaves.get(l)):
                prob = torch.softmax(model(input_ids=ids).logits[0, -1], -1)[target]
            grads = torch.autograd.grad(prob, [leaves[l] for l in layer_set])
            for l, g in zip(layer_set, grads):
                scores[l] += (clean[l] * g / steps)[0]
    return scores


@pytest.mark.parametrize("prefix_cache", [True, False], ids=["cached", "full"])
@pytest.mark.parametrize("ig_path", ["all_layers", "per_layer"])
def test_batched_ig_equals_per_step_loop(tiny_llama_dir, ig_path, prefix_cache):
    model, tok, arch = load_causal_lm(ModelConfig(name_or_path=str(tiny_llama_dir)))
    rows = [tok("the capital of france is")["input_ids"], tok("the tower is located in the city of")["input_ids"]]
    targets = [tok.convert_tokens_to_ids("paris"), tok.convert_tokens_to_ids("rome")]
    cfg = AttributionConfig(steps=7, ig_path=ig_path, batch_rows=5, prefix_cache=prefix_cache)  # chunks cut across rows
    batched = attribute_rows(model, arch, rows, targets, cfg, pad_id=tok.pad_token_id)
    for i, (row, tgt) in enumerate(zip(rows, targets)):
        ref = _reference_ig(model, arch, row, tgt, 7, per_layer=ig_path == "per_layer")
        assert (batched[i] - ref).abs().max() < 1e-4


def test_grad_x_act_equals_one_step_ig(tiny_llama_dir):
    model, tok, arch = load_causal_lm(ModelConfig(name_or_path=str(tiny_llama_dir)))
    rows = [tok("the capital of france is")["input_ids"]]
    tgt = [tok.convert_tokens_to_ids("paris")]
    gxa = attribute_rows(model, arch, rows, tgt, AttributionConfig(method="grad_x_act"), pad_id=0)
    ig1 = attribute_rows(model, arch, rows, tgt, AttributionConfig(steps=1), pad_id=0)
    assert (gxa - ig1).abs().max() < 1e-6


@pytest.mark.parametrize(
    "cfg",
    [
        AttributionConfig(method="grad_x_act"),
        AttributionConfig(steps=10, ig_path="all_layers"),
        AttributionConfig(steps=10, ig_path="per_layer"),
    ],
    ids=["grad_x_act", "ig_all_layers", "ig_per_layer"],
)
def test_planted_neuron_ranks_first(tiny_llama_dir, cfg):
    """One neuron is built to carry the answer: its value vector points at the
    answer's unembedding; every method must rank it first."""
    model, tok, arch = load_causal_lm(ModelConfig(name_or_path=str(tiny_llama_dir)))
    layer, neuron = 1, 17
    row = tok("the capital of france is")["input_ids"]
    target = tok.convert_tokens_to_ids("berlin")
    modules = mlp_out_modules(model, arch)
    acts = {}
    with torch.no_grad(), last_position_patch(modules, lambda l, x: acts.__setitem__(l, x.clone())):
        model(input_ids=torch.tensor([row]))
    head = model.get_output_embeddings().weight  # [V, d_model]
    with torch.no_grad():
        head[target] *= 10.0  # random init logits are tiny; give the answer a readable one
    direction = head[target].detach().clone()  # [d_model]
    with torch.no_grad():
        # Large enough to dominate the residual stream at the last position.
        modules[layer].weight[:, neuron] = 50.0 / acts[layer][0, neuron] * direction / direction.norm()
        before = torch.softmax(model(input_ids=torch.tensor([row])).logits[0, -1], -1)[target]
    assert before > 0.5  # the planted neuron really carries the answer
    scores = attribute_rows(model, arch, [row], [target], cfg, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)[0]
    best = int(scores.flatten().argmax())
    assert divmod(best, scores.shape[1]) == (layer, neuron)


def test_eos_baseline_is_the_mean_of_single_token_ablations(tiny_llama_dir):
    from mke_lightning.attribution import _capture, _eos_baseline
    from mke_lightning.scoring import left_pad

    model, tok, arch = load_causal_lm(ModelConfig(name_or_path=str(tiny_llama_dir)))
    modules = mlp_out_modules(model, arch)
    row = tok("the capital of france is")["input_ids"]
    b = _eos_baseline(model, modules, [row], tok.eos_token_id, 0, True, 64, "cpu")[0]  # [L, F]
    manual = []
    for j in range(1, len(row)):  # position 0 (BOS) is kept
        v = list(row)
        v[j] = tok.eos_token_id
        manual.append(_capture(model, modules, *left_pad([v], 0), 64)[0])
    assert (b - torch.stack(manual).mean(0)).abs().max() < 1e-6
    cfg = AttributionConfig(steps=50, ig_path="per_layer", baseline="eos")
    tgt = tok.convert_tokens_to_ids("paris")
    scores = attribute_rows(model, arch, [row], [tgt], cfg, pad_id=0, eos_id=tok.eos_token_id)[0]
    assert scores.abs().sum() > 0


def test_categories_follow_the_definition(tiny_llama_dir, toy_records):
    model, tok, arch = load_causal_lm(ModelConfig(name_or_path=str(tiny_llama_dir)))
    cfg = LocalizationConfig(attribution=AttributionConfig(steps=3), cross_languages=["en", "fr", "de"], threshold=0.2)
    mask = locate(model, tok, arch, toy_records[0], "en", cfg)
    # Per-language sets from single-language runs: cross languages = the language alone.
    per_lang = {}
    for lang in ["en", "fr", "de"]:
        m = locate(model, tok, arch, toy_records[0], lang, LocalizationConfig(attribution=cfg.attribution, cross_languages=[lang], threshold=0.2))
        per_lang[lang] = {(l, i) for l, idx in m.category("independent").items() for i in idx}
    indep = {(l, i) for l, idx in mask.category("independent").items() for i in idx}
    spec = {(l, i) for l, idx in mask.category("specific").items() for i in idx}
    assert indep == per_lang["en"] & per_lang["fr"] & per_lang["de"]
    assert spec == per_lang["en"] - indep


def test_edit_moves_the_answer_on_a_tiny_model(tiny_llama_dir, toy_records):
    from mke_lightning.evaluation import EditEvaluator, build_items

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
