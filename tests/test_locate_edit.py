"""ROME, MEMIT and AlphaEdit: their closed forms against direct solves, AlphaEdit's preservation, the
sequential memory of earlier edits, and runs through KnowledgeEditor.edit and `mke fit` on tiny models;
one real MzsRE edit with AlphaEdit on the embedded model."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import out_projection_changes, toy_record, two_fact_records
from mke_lightning.editing.editor import KnowledgeEditor
from mke_lightning.editing.key_statistics import KeyStatistics, KeyStatsConfig, null_space_projector
from mke_lightning.editing.methods.locate_edit import SolveConfig, subject_end
from mke_lightning.modeling.forward import encode_prompt, left_pad
from mke_lightning.modeling.loading import ModelConfig

TEXT = ["the capital of france is paris", "honey is made by bees", "the sky is blue", "der himmel ist blau"]


def _keys_of(editor, texts: list[str], layers: list[int]) -> dict[int, torch.Tensor]:
    """Every non-BOS position's key ``[N, d_ff]`` at each layer, over ``texts`` (hooked activations)."""
    rows = [encode_prompt(editor.tokenizer, t) for t in texts]
    ids, mask, pos = left_pad(rows, editor.tokenizer.pad_token_id)
    keep = mask.bool().clone()
    keep[torch.arange(len(rows)), ids.shape[1] - torch.tensor([len(r) for r in rows])] = False  # BOS out
    caught = {}
    hooks = [editor.causal_lm.get_submodule(editor.arch.mlp_out_name(l)).register_forward_pre_hook(
        lambda m, a, l=l: caught.__setitem__(l, a[0][keep].detach().double())) for l in layers]
    try:
        with torch.no_grad():
            editor.causal_lm(input_ids=ids, attention_mask=mask, position_ids=pos)
    finally:
        for h in hooks:
            h.remove()
    return caught


def _editor(model_dir, method: str, layers: list[int], protocol: str = "single", texts=TEXT, **solve) -> KnowledgeEditor:
    """An editor on a tiny model whose key statistics are a stub: E[k kᵀ] of hooked keys over ``texts``."""
    ed = KnowledgeEditor(lm=ModelConfig(name_or_path=str(model_dir)), method=method, protocol=protocol,
                         solve=SolveConfig(layers=layers, **solve))
    ed.configure_model()
    keys = _keys_of(ed, texts, layers)
    ed.method_impl._stats = KeyStatistics({l: (k.T @ k / len(k)).float() for l, k in keys.items()},
                                          {l: len(k) for l, k in keys.items()})
    return ed


@pytest.fixture(params=["tiny_llama_dir", "tiny_gpt2_dir"])
def model_dir(request):
    return request.getfixturevalue(request.param)


def _problem(ed, layer: int, units: int = 2, seed: int = 0):
    """Real edit-like keys ``[d_ff, U]`` (keys of two prompts) and random residuals ``[d_model, U]``."""
    k = _keys_of(ed, ["the tower is located in the city of", "the capital of france is"], [layer])[layer][-units:].T
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(ed.method_impl.weight(layer).shape[0], units, generator=g, dtype=torch.float64)
    return k, r


# ---------------------------------------------------------------- closed forms against direct solves


def test_rome_is_the_least_change_that_meets_the_keys_exactly(model_dir):
    ed = _editor(model_dir, "rome", [1], texts=TEXT * 8)
    k, r = _problem(ed, 1)
    dw = ed.method_impl.solve_layer(1, k, r)  # [d_model, d_ff]
    # Direct: minimise tr(ΔW C ΔWᵀ) subject to ΔW K = R, through its KKT system [[C, K], [Kᵀ, 0]].
    c = ed.method_impl.regularised(1)
    d, u = k.shape
    kkt = torch.zeros(d + u, d + u, dtype=torch.float64)
    kkt[:d, :d], kkt[:d, d:], kkt[d:, :d] = c, k, k.T
    rhs = torch.cat([torch.zeros(d, r.shape[0], dtype=torch.float64), r.T])
    direct = torch.linalg.solve(kkt, rhs)[:d].T
    assert torch.allclose(dw, direct, atol=1e-8 * direct.abs().max())
    assert torch.allclose(dw @ k, r, atol=1e-8)
    one = ed.method_impl.solve_layer(1, k[:, :1], r[:, :1])
    assert torch.linalg.matrix_rank(one).item() == 1  # one key: rank one


def test_memit_equals_the_weighted_least_squares_solve(model_dir):
    ed = _editor(model_dir, "memit", [0, 1], mom2_weight=3.0)
    for layer in (0, 1):
        k, r = _problem(ed, layer)
        dw = ed.method_impl.solve_layer(layer, k, r)
        # Direct: argmin ||ΔW K - R||² + λ tr(ΔW C ΔWᵀ) as one stacked least-squares problem,
        # ΔW [K, √λ L] ≈ [R, 0] with C = L Lᵀ.
        ell = torch.linalg.cholesky(ed.method_impl.regularised(layer))
        a = torch.cat([k, (3.0 ** 0.5) * ell], dim=1)  # [d_ff, U + d_ff]
        b = torch.cat([r, torch.zeros(r.shape[0], ell.shape[1], dtype=torch.float64)], dim=1)
        direct = torch.linalg.lstsq(a.T, b.T).solution.T
        assert torch.allclose(dw, direct, atol=1e-7 * direct.abs().max())


def test_alphaedit_equals_its_full_space_formula(model_dir):
    ed = _editor(model_dir, "alphaedit", [1], null_mode="absolute", null_threshold=1e-6, l2=0.5)
    m = ed.method_impl
    k, r = _problem(ed, 1)
    kp, _ = _problem(ed, 1, units=1, seed=1)
    earlier = 2.0 * (kp @ kp.T)
    m.earlier[1] = kp @ kp.T
    ed.solve_config.earlier_weight = 2.0
    dw = m.solve_layer(1, k, r)
    c = m.second_moment(1)
    p = null_space_projector(c, 1e-6, "absolute")  # [d_ff, d_ff]
    l2 = 0.5 * float(torch.diagonal(c).mean())
    eye = torch.eye(c.shape[0], dtype=torch.float64)
    direct = torch.linalg.solve(p @ (earlier + k @ k.T) + l2 * eye, p @ k @ r.T).T  # AlphaEdit's closed form
    assert 0 < m.null_rank(1) < c.shape[0]
    assert torch.allclose(dw, direct, atol=1e-7 * direct.abs().max())


def test_the_neuron_masked_solves_are_their_closed_forms_on_the_chosen_neurons(model_dir):
    """``solve.neurons``: MEMIT's masked solve is the weighted least squares over those columns alone (``C``
    restricted to them), ROME's meets the keys exactly with them alone, AlphaEdit's stays in the null
    space of the restricted ``C``."""
    idx = torch.tensor([1, 4, 7, 9, 12, 20, 31, 40])
    ed = _editor(model_dir, "memit", [1], mom2_weight=3.0)
    k, r = _problem(ed, 1)
    dw = ed.method_impl.solve_masked(1, k[idx], r, idx)  # [d_model, n]
    ell = torch.linalg.cholesky(ed.method_impl.regularised(1)[idx][:, idx])
    a = torch.cat([k[idx], (3.0 ** 0.5) * ell], dim=1)
    b = torch.cat([r, torch.zeros(r.shape[0], len(idx), dtype=torch.float64)], dim=1)
    direct = torch.linalg.lstsq(a.T, b.T).solution.T
    assert dw.shape == (r.shape[0], len(idx)) and torch.allclose(dw, direct, atol=1e-7 * direct.abs().max())
    rome = _editor(model_dir, "rome", [1], texts=TEXT * 8)
    k, r = _problem(rome, 1)
    assert torch.allclose(rome.method_impl.solve_masked(1, k[idx], r, idx) @ k[idx], r, atol=1e-7)
    ae = _editor(model_dir, "alphaedit", [1], null_mode="absolute", null_threshold=1e-6)
    k, r = _problem(ae, 1)
    c = ae.method_impl.second_moment(1)[idx][:, idx]
    dw = ae.method_impl.solve_masked(1, k[idx], r, idx)
    used = c.diagonal() > 0  # the restricted C's range: an update confined to its null space leaves it alone
    assert torch.allclose(dw @ c, torch.zeros_like(dw @ c), atol=1e-6 * float(c.abs().max()) * float(dw.abs().max()) + 1e-12)
    assert used.any()


def test_a_neuron_masked_edit_changes_only_the_chosen_neurons(tiny_llama_dir, toy_records):
    ed = _editor(tiny_llama_dir, "memit", [0, 1], neurons=5, clamp_norm_factor=20.0)
    before = {k: v.clone() for k, v in ed.causal_lm.state_dict().items()}
    out = ed.edit(toy_records[0], None)
    assert out.failed is None and out.neurons == 2 * 5
    for layer, dw in out_projection_changes(ed, before).items():
        moved = (dw.abs().sum(dim=0) > 0).sum().item()  # neurons whose value vector changed
        assert 0 < moved <= 5, (layer, moved)
    ed.restore()


# ---------------------------------------------------------------- preservation


def test_an_alphaedit_update_leaves_the_preserved_keys_outputs_unchanged(tiny_llama_dir, toy_records):
    ed = _editor(tiny_llama_dir, "alphaedit", [0, 1], null_mode="absolute", null_threshold=1e-7,
                 clamp_norm_factor=20.0)
    before = {k: v.clone() for k, v in ed.causal_lm.state_dict().items()}
    preserved = _keys_of(ed, TEXT, [0, 1])  # the keys the statistics were taken over: [N, d_ff] per layer
    out = ed.edit(toy_records[0], None)
    assert out.failed is None and out.neurons == 2 * 64
    changes = out_projection_changes(ed, before)  # layer -> ΔW [d_model, d_ff]
    assert sorted(changes) == [0, 1]
    for layer, dw in changes.items():
        w = before[ed.arch.mlp_out_name(layer) + ".weight"].double()
        k0 = preserved[layer].T  # [d_ff, N]
        moved = (dw.double() @ k0).norm() / (w @ k0).norm()
        assert moved < 1e-4, f"layer {layer}: preserved outputs moved by {moved:.2e} of their norm"
        assert dw.abs().max() > 0
    ed.restore()
    assert all(torch.equal(v, before[k]) for k, v in ed.causal_lm.state_dict().items())


def test_sequential_alphaedit_keeps_an_earlier_edits_keys(tiny_llama_dir):
    a, b = two_fact_records()
    # one mean key per edit and keep_other_positions off: on a 64-neuron layer the rows and the prompts' other
    # tokens span most of the key space, leaving the subject's key little of its own to write (the test is
    # about the earlier keys; the real-model test below runs the defaults)
    ed = _editor(tiny_llama_dir, "alphaedit", [1], protocol="sequential", null_mode="absolute", null_threshold=1e-7,
                 clamp_norm_factor=20.0, keep_other_positions=0.0, keys="mean")
    seen = []
    remember = ed.method_impl.remember
    ed.method_impl.remember = lambda layer, keys: (seen.append(keys.clone()), remember(layer, keys))
    name = ed.arch.mlp_out_name(1) + ".weight"
    w0 = ed.causal_lm.state_dict()[name].double().clone()
    ed.edit(a, None)
    w1 = ed.causal_lm.state_dict()[name].double().clone()
    ed.edit(b, None)
    w2 = ed.causal_lm.state_dict()[name].double().clone()
    ka = seen[0]  # [d_ff, 1]: the first edit's key
    written = ((w1 - w0) @ ka).norm()  # what the first edit wrote on its key
    drift = ((w2 - w1) @ ka).norm()  # what the second edit changed there
    assert written > 0 and drift < 0.05 * written, f"the later edit moved the earlier key's value by {drift / written:.3f}"
    assert torch.allclose(ed.method_impl.earlier[1], sum(k @ k.T for k in seen))
    # the memory survives a checkpoint: a fresh instance with the saved state solves alike
    state = ed.method_impl.state_dict()
    fresh = _editor(tiny_llama_dir, "alphaedit", [1], protocol="sequential", null_mode="absolute", null_threshold=1e-7)
    fresh.method_impl.load_state_dict(state)
    k, r = _problem(fresh, 1)
    assert torch.allclose(fresh.method_impl.solve_layer(1, k, r), ed.method_impl.solve_layer(1, k, r))


def test_single_protocol_keeps_no_memory(tiny_llama_dir, toy_records):
    ed = _editor(tiny_llama_dir, "alphaedit", [1])
    ed.edit(toy_records[0], None)
    ed.restore()
    assert ed.method_impl.earlier == {} and ed.method_impl.state_dict() == {"earlier": {}}


# ---------------------------------------------------------------- through the editor and `mke fit`


@pytest.mark.parametrize("method,layers", [("rome", [1]), ("memit", [0, 1]), ("alphaedit", [0, 1])])
def test_each_method_edits_through_the_editor(model_dir, method, layers, toy_records):
    ed = _editor(model_dir, method, layers, clamp_norm_factor=20.0, v_steps=30)
    before = {k: v.clone() for k, v in ed.causal_lm.state_dict().items()}
    out = ed.edit(toy_records[0], None)
    assert out.failed is None and out.steps >= 1 and 0 <= out.p_new <= 1
    assert sorted(out_projection_changes(ed, before)) == layers  # only the output projections of the edit layers
    ed.restore()
    assert all(torch.equal(v, before[k]) for k, v in ed.causal_lm.state_dict().items())


def test_the_edit_raises_the_new_target(tiny_llama_dir):
    """A random tiny model barely carries one token's MLP output to a later position, so the subject
    ends this prompt: the solved update must at least double P(new target) from about 1 / vocabulary
    (its final norm and small head weights cap how far one hidden state can move the logits)."""
    from mke_lightning.data.records import record_from_dict

    raw = toy_record("end")
    raw["languages"]["en"].update(prompt="the capital of the tower", subject="tower")
    record = record_from_dict(raw)
    ed = _editor(tiny_llama_dir, "rome", [1], clamp_norm_factor=1e4, v_steps=60, v_lr=5.0, kl_factor=0.0,
                 v_weight_decay=0.0, contexts=0)
    out = ed.edit(record, None)
    assert out.p_new > 2 / ed.causal_lm.config.vocab_size  # from about 1 / 48: the final norm caps a random model


def test_the_subject_token_is_found(tiny_llama_dir):
    ed = _editor(tiny_llama_dir, "rome", [1])
    tok = ed.tokenizer
    text = "the tower is located in the city of"
    assert subject_end(tok, text, 0, "tower") == 2  # <bos> the tower
    assert subject_end(tok, text, 0, "not there") == len(encode_prompt(tok, text)) - 1
    assert subject_end(tok, "the city . " + text, 11, "the") == 4  # <bos> the city . the: the occurrence after the prefix


def test_methods_refuse_missing_or_wrong_layers():
    with pytest.raises(ValueError, match="solve.layers"):
        KnowledgeEditor(method="memit")
    with pytest.raises(ValueError, match="one index"):
        KnowledgeEditor(method="rome", solve=SolveConfig(layers=[1, 2]))
    with pytest.raises(ValueError, match="ascending"):
        SolveConfig(layers=[3, 1])
    assert not KnowledgeEditor(method="alphaedit", solve=SolveConfig(layers=[1])).needs_masks


@pytest.mark.parametrize("method,layers", [("alphaedit", "[0, 1]"), ("rome", "[1]")])
def test_a_locate_then_edit_method_runs_through_mke_fit(tmp_path, tiny_llama_dir, method, layers):
    from mke_lightning.cli import cli_main
    from test_cli import _toy_args

    args = _toy_args(tmp_path, tiny_llama_dir) + [
        "--model.method", method, "--model.protocol", "sequential", "--model.solve.layers", layers,
        "--model.solve.stats.languages", "[en]", "--model.solve.stats.tokens_per_language", "32",
        "--model.solve.stats.max_length", "12", "--model.solve.stats.cache_dir", str(tmp_path / "key-stats"),
        "--model.solve.v_steps", "5", "--model.save_deltas", "true",
    ]
    cli = cli_main(args)
    assert [o.failed for o in cli.model.outcomes] == [None, None]
    results = json.loads(next((tmp_path / "runs").rglob("results.json")).read_text())
    assert results["method"] == method and results["settings"]["solve"]["layers"] == json.loads(layers)
    assert len(sorted((tmp_path / "runs").rglob("deltas/*.safetensors"))) == 2
    assert any((tmp_path / "key-stats").rglob("layers/1.safetensors"))  # statistics of the edit layers, cached


def test_the_rows_other_positions_are_every_token_but_bos_the_subject_and_padding(tiny_llama_dir, toy_records):
    """``keep_other_positions`` fits ``ΔW k ≈ 0`` on these keys: each NLL row's prompt and target tokens
    (the row as the optimiser ran it) less its BOS and its subject's last token, nothing of the padding."""
    from mke_lightning.editing.methods.locate_edit import EditRows, other_keys

    ed = _editor(tiny_llama_dir, "memit", [1])
    impl = ed.method_impl
    rows = EditRows(ed.tokenizer, toy_records, ["en"], "en", impl.contexts())
    other = other_keys(ed, rows, 1)  # [M, d_ff]
    lengths = [len(rows.prompts[i]) + len(rows.targets[i]) - 1 for i in rows.nll_rows]
    assert len(set(lengths)) > 1  # rows of different lengths: padding is present
    assert other.shape == (sum(n - 2 for n in lengths), ed.causal_lm.config.intermediate_size)
    # the same keys, row by row without padding
    expect = []
    for i in rows.nll_rows:
        ids = torch.tensor([rows.prompts[i] + rows.targets[i][:-1]])
        caught = {}
        h = ed.causal_lm.get_submodule(ed.arch.mlp_out_name(1)).register_forward_pre_hook(
            lambda m, a, caught=caught: caught.__setitem__("k", a[0][0]))
        with torch.no_grad():
            ed.causal_lm(input_ids=ids)
        h.remove()
        keep = [j for j in range(ids.shape[1]) if j not in (0, rows.subject_pos[i])]
        expect.append(caught["k"][keep])
    torch.testing.assert_close(other, torch.cat(expect).float(), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- the embedded model


def test_the_cached_prefix_gives_the_same_logits(model_dir, toy_records):
    from mke_lightning.editing.methods.locate_edit import CachedRows, EditRows, PackedRows

    ed = _editor(model_dir, "rome", [1])
    rows = EditRows(ed.tokenizer, toy_records, ["en", "fr"], "en", ed.method_impl.contexts() + ["the city"])
    pad = ed.tokenizer.pad_token_id
    with torch.no_grad():
        cached = CachedRows(ed.causal_lm, rows, pad, ed.device).logits()
        packed = PackedRows(ed.causal_lm, rows, pad, ed.device).logits()
    assert len(cached) == len(packed) == len(rows.prompts)
    for c, p, t in zip(cached, packed, rows.targets):
        assert c.shape == p.shape == (len(t), ed.causal_lm.config.vocab_size)
        assert torch.allclose(c, p, atol=1e-5)


# ---------------------------------------------------------------- the embedded model


@pytest.mark.real_model
def test_real_alphaedit_edit_holds_and_leaves_its_locality_probe(real_model, mzsre_dir, tmp_path_factory):
    """One MzsRE edit with configs/mzsre/alphaedit.yaml's solve settings (statistics over a small English
    sample, so that the test computes them in about a minute): the edit is written (reliability >= 0.9
    from < 0.5) and the record's locality probe keeps the pre-edit answer (>= 0.9); undone exactly."""
    import yaml

    from mke_lightning.data import read_mzsre
    from mke_lightning.evaluation.evaluator import EditEvaluator, build_items

    model, tok, arch = real_model
    solve = yaml.safe_load(open("configs/mzsre/alphaedit.yaml"))["model"]["solve"]
    solve["stats"] = KeyStatsConfig(languages=["en"], tokens_per_language=512,
                                    cache_dir=str(tmp_path_factory.mktemp("key-stats")))
    ed = KnowledgeEditor(method="alphaedit", solve=SolveConfig(**solve))
    ed.causal_lm, ed.tokenizer, ed.arch = model, tok, arch
    record = read_mzsre(mzsre_dir, ["en"])[1]
    ev = EditEvaluator(tok)
    items = [i for i in build_items(record, ["en"]) if i.measure in ("reliability", "locality")]
    refs = ev.references(model, items)

    def measured():
        rows = ev.score(model, items, refs)
        return {m: min(r["token_acc"] for r in rows if r["measure"] == m) for m in ("reliability", "locality")}

    before = {k: v.clone() for k, v in model.state_dict().items()}
    pre = measured()
    out = ed.edit(record, None)
    post = measured()
    ed.restore()
    assert out.failed is None and pre["reliability"] < 0.5
    assert post["reliability"] >= 0.9 and post["locality"] >= 0.9, (pre, post, out)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
