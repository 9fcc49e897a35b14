"""Preservation statistics: E[k kᵀ] per layer, its cache, its text sample, and the null-space projectors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from mke_lightning.editing import key_sample
from mke_lightning.editing import key_statistics as ks
from mke_lightning.editing.key_statistics import (
    KeyStatistics,
    KeyStatsConfig,
    cache_folder,
    key_statistics,
    masked_null_space_projector,
    null_space_projector,
)
from mke_lightning.modeling.loading import ModelConfig, load_causal_lm


def _load(folder):
    return load_causal_lm(ModelConfig(name_or_path=str(folder)))


def _small(**kw) -> KeyStatsConfig:
    base = dict(languages=["en", "fr"], tokens_per_language=40, max_length=12, generation_batch=3, batch_size=2)
    base.update(kw)
    return KeyStatsConfig(**base)


class Counter:
    """Counts calls of a module function it wraps; raises after ``fail_after`` calls when set."""

    def __init__(self, monkeypatch, module, name, fail_after=None):
        self.calls = 0
        self.fail_after = fail_after
        inner = getattr(module, name)

        def wrapped(*a, **k):
            if self.fail_after is not None and self.calls >= self.fail_after:
                raise RuntimeError("killed")
            self.calls += 1
            return inner(*a, **k)

        monkeypatch.setattr(module, name, wrapped)


@torch.no_grad()
def _direct_moment(model, tokenizer, arch, texts, layer, max_length):
    """C from the keys grabbed one passage at a time, every position but the first, float64."""
    keys = []
    module = model.get_submodule(arch.mlp_out_name(layer))
    h = module.register_forward_pre_hook(lambda m, args: keys.append(args[0][0, 1:].double()))
    try:
        for t in texts:
            ids = tokenizer(t, add_special_tokens=True)["input_ids"][:max_length]
            model(input_ids=torch.tensor([ids]))
    finally:
        h.remove()
    k = torch.cat(keys)  # [N, d_ff]
    return k.T @ k / k.shape[0], k.shape[0]


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_second_moment_equals_direct_computation(fixture, request):
    model, tok, arch = _load(request.getfixturevalue(fixture))
    cfg = _small(cache=False)
    stats = key_statistics(model, tok, arch, cfg)
    sample = ks.build_sample(model, tok, cfg)["sample"]  # seeded: the same passages again
    texts = [t for lang in cfg.resolved_languages for t in sample[lang]]
    assert len(texts) == 2 * 4  # ceil(40 / 11) passages per language
    assert stats.layers == [0, 1]
    for layer in stats.layers:
        want, n = _direct_moment(model, tok, arch, texts, layer, cfg.max_length)
        got = stats.second_moment(layer)
        assert got.dtype == torch.float32 and got.device.type == "cpu"
        assert got.shape == (model.config.intermediate_size if fixture == "tiny_llama_dir" else 4 * 32,) * 2
        assert stats.tokens(layer) == n
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
        assert torch.equal(got, got.T)


def test_generation_is_seeded_and_leaves_the_callers_rng(tiny_llama_dir):
    model, tok, arch = _load(tiny_llama_dir)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = ks.build_sample(model, tok, _small(cache=False))
    assert torch.equal(torch.get_rng_state(), before)
    b = ks.build_sample(model, tok, _small(cache=False))
    c = ks.build_sample(model, tok, _small(cache=False, seed=1))
    assert a["digest"] == b["digest"] != c["digest"]
    # a language's passages do not depend on which other languages are drawn
    en = ks.build_sample(model, tok, _small(cache=False, languages=["en"]))
    assert en["sample"]["en"] == a["sample"]["en"]


def test_cache_reused_and_invalidated(tiny_llama_dir, tmp_path, monkeypatch):
    model, tok, arch = _load(tiny_llama_dir)
    cfg = _small(cache_dir=str(tmp_path))
    forward = Counter(monkeypatch, ks, "_accumulate_batch")
    generate = Counter(monkeypatch, key_sample, "generate_batch")
    first = key_statistics(model, tok, arch, cfg)
    n_batches, n_generated = forward.calls, generate.calls
    assert n_batches == 4 and n_generated == 4  # 8 passages in batches of 2; 2 languages x 2 generation batches

    again = key_statistics(model, tok, arch, _small(cache_dir=str(tmp_path), batch_size=5, checkpoint_tokens=7))  # speed-only settings
    assert (forward.calls, generate.calls) == (n_batches, n_generated)
    for l in first.layers:
        assert torch.equal(again.second_moment(l), first.second_moment(l))
        assert again.tokens(l) == first.tokens(l)

    key_statistics(model, tok, arch, _small(cache_dir=str(tmp_path), seed=1))  # a setting that changes the sample
    assert forward.calls == 2 * n_batches and generate.calls == 2 * n_generated

    with torch.no_grad():
        model.get_submodule(arch.mlp_out_name(0)).weight[:, 0] += 0.5  # a changed model (layer 1's keys move)
    changed = key_statistics(model, tok, arch, cfg)
    assert forward.calls == 3 * n_batches
    assert not torch.equal(changed.second_moment(1), first.second_moment(1))
    assert len(list(tmp_path.iterdir())) == 3  # one folder per (model, settings)


def test_cache_adds_missing_layers_only(tiny_llama_dir, tmp_path, monkeypatch):
    model, tok, arch = _load(tiny_llama_dir)
    cfg = _small(cache_dir=str(tmp_path))
    only0 = key_statistics(model, tok, arch, cfg, layers=[0])
    assert only0.layers == [0]
    generate = Counter(monkeypatch, key_sample, "generate_batch")
    both = key_statistics(model, tok, arch, cfg)
    assert generate.calls == 0  # the cached sample is reused for the new layer
    assert both.layers == [0, 1] and torch.equal(both.second_moment(0), only0.second_moment(0))
    fresh = key_statistics(model, tok, arch, _small(cache=False))
    torch.testing.assert_close(both.second_moment(1), fresh.second_moment(1))
    # a saved folder reads back through KeyStatistics.load
    loaded = KeyStatistics.load(cache_folder(cfg, both.metadata["model_fingerprint"]))
    assert loaded.layers == [0, 1] and loaded.tokens(1) == both.tokens(1)
    assert torch.equal(loaded.second_moment(1), both.second_moment(1))
    assert loaded.metadata["sample_digest"] == both.metadata["sample_digest"]


def test_killed_computation_resumes(tiny_llama_dir, tmp_path, monkeypatch):
    model, tok, arch = _load(tiny_llama_dir)
    whole = key_statistics(model, tok, arch, _small(cache_dir=str(tmp_path / "whole")))
    cfg = _small(cache_dir=str(tmp_path / "killed"), checkpoint_tokens=1)  # save after every batch
    with monkeypatch.context() as m:
        Counter(m, ks, "_accumulate_batch", fail_after=3)
        with pytest.raises(RuntimeError, match="killed"):
            key_statistics(model, tok, arch, cfg)
    folder = cache_folder(cfg, whole.metadata["model_fingerprint"])
    partial = folder / "partial" / "rank0-of1.safetensors"
    assert partial.exists() and not (folder / "layers").exists()
    forward = Counter(monkeypatch, ks, "_accumulate_batch")
    generate = Counter(monkeypatch, key_sample, "generate_batch")
    resumed = key_statistics(model, tok, arch, cfg)
    assert forward.calls == 1 and generate.calls == 0  # 3 of the 4 batches were saved, the sample too
    assert not partial.exists()
    for l in whole.layers:
        assert torch.equal(resumed.second_moment(l), whole.second_moment(l))
        assert resumed.tokens(l) == whole.tokens(l)


def test_disjointness_rule_drops_overlapping_passages(tiny_llama_dir, tmp_path):
    model, tok, arch = _load(tiny_llama_dir)
    probe = "the capital of france is paris the tower is located in the city of rome"
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"id": "r1", "languages": {"en": {"locality": [{"prompt": probe, "answer": "x"}]}}}) + "\n")
    clean = "honey is made by bees and the sky is blue"
    source = tmp_path / "text.json"
    source.write_text(json.dumps({"en": [f"what colour is {probe} le ciel", clean]}))
    cfg = KeyStatsConfig(languages=["en"], source=str(source), exclude=[str(bench)], tokens_per_language=100, cache=False)
    built = ks.build_sample(model, tok, cfg)
    assert built["sample"] == {"en": [clean]} and built["dropped"] == {"en": 1}
    # without the benchmark file both passages stay
    kept = ks.build_sample(model, tok, KeyStatsConfig(languages=["en"], source=str(source), tokens_per_language=100, cache=False))
    assert len(kept["sample"]["en"]) == 2
    # seven shared tokens are allowed, eight are not
    guard = key_sample.NgramGuard(tok, [probe], n=8)
    words = probe.split()
    assert not guard.overlaps(" ".join(words[:7]) + " bees")
    assert guard.overlaps("bees " + " ".join(words[3:11]))
    stats = key_statistics(model, tok, arch, cfg)
    assert stats.metadata["dropped"] == {"en": 1}


def test_packaged_evaluation_text_is_always_excluded():
    strings = key_sample.evaluation_strings()
    ppl = key_sample.packaged_json("perplexity_sample.json")
    anchors = key_sample.packaged_json("anchor_prompts.json")
    assert set(ppl["en"]) <= set(strings) and set(anchors["zh"]) <= set(strings)
    # the openers share no 8-token run with them (checked with a whitespace tokenizer here)
    openers = key_sample.load_openers()
    assert {"en", "cs", "de", "nl", "es", "fr", "pt", "ru", "th", "tr", "vi", "zh"} <= set(openers)
    assert not set(o for v in openers.values() for o in v) & set(strings)


def test_settings_key_ignores_speed_settings_only():
    a = ks.settings_key(KeyStatsConfig())
    assert a == ks.settings_key(KeyStatsConfig(batch_size=1, checkpoint_tokens=0, cache=False, cache_dir="/x"))
    for change in ({"seed": 1}, {"tokens_per_language": 10}, {"max_length": 64}, {"languages": ["en"]}, {"skip_first": False}, {"top_p": 0.5}):
        assert ks.settings_key(KeyStatsConfig(**change)) != a, change
    assert KeyStatsConfig().resolved_languages == ["en", "cs", "de", "nl", "es", "fr", "pt", "ru", "th", "tr", "vi", "zh"]
    with pytest.raises(ValueError):
        KeyStatsConfig(max_length=1)
    with pytest.raises(ValueError):
        KeyStatsConfig(languages=[])


def _psd(d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    vals = torch.logspace(-6, 2, d, dtype=torch.float64)  # ascending spectrum 1e-6 .. 1e2
    return (q * vals) @ q.T, vals


def test_null_space_projector_absolute():
    C, vals = _psd()
    P = null_space_projector(C, threshold=1e-3, mode="absolute")
    k = int((vals < 1e-3).sum())
    assert k == 5
    torch.testing.assert_close(P @ P, P, atol=1e-10, rtol=0)
    torch.testing.assert_close(P, P.T)
    assert round(float(torch.trace(P))) == k
    assert torch.linalg.matrix_norm(P @ C @ P, ord=2) < 1e-3  # the preserved keys barely reach the projected space
    # an update projected by P leaves keys in C's high-energy directions (almost) where they were
    top = torch.linalg.eigh(C).eigenvectors[:, -1]
    assert (P @ top).norm() < 1e-8
    assert torch.count_nonzero(null_space_projector(C, threshold=0.0, mode="absolute")) == 0  # may be empty


def test_null_space_projector_energy_and_masked():
    C, vals = _psd()
    P = null_space_projector(C, threshold=0.01, mode="energy")
    k = round(float(torch.trace(P)))
    assert float(vals[:k].sum()) <= 0.01 * float(vals.sum()) < float(vals[: k + 1].sum())
    torch.testing.assert_close(P @ P, P, atol=1e-10, rtol=0)
    assert float(torch.trace(P @ C)) <= 0.01 * float(torch.trace(C)) + 1e-9
    # never empty unless asked
    P1 = null_space_projector(C, threshold=0.0, mode="energy")
    assert round(float(torch.trace(P1))) == 1
    assert torch.count_nonzero(null_space_projector(C, threshold=0.0, mode="energy", min_rank=0)) == 0
    # the masked helper is the projector of the sub-matrix
    idx = [7, 2, 9, 0]
    Pm = masked_null_space_projector(C.float(), idx, 0.05, "energy")
    assert Pm.shape == (4, 4) and Pm.dtype == torch.float32
    torch.testing.assert_close(Pm, null_space_projector(C[idx][:, idx], 0.05, "energy").float())
    with pytest.raises(ValueError):
        null_space_projector(C, 0.1, mode="relative")


def _ranked(rank, world, folder, root, out):
    import torch.distributed as dist

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=world)
    try:
        model, tok, arch = _load(folder)
        stats = key_statistics(model, tok, arch, _small(cache_dir=f"{root}/cache-{rank}"))
        if rank == 0:
            torch.save({l: (stats.second_moment(l), stats.tokens(l)) for l in stats.layers}, out)
    finally:
        dist.destroy_process_group()


def test_two_ranks_split_the_sample_and_sum(tiny_llama_dir, tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "ranked.pt"
    mp.spawn(_ranked, args=(2, str(tiny_llama_dir), str(tmp_path), str(out)), nprocs=2, join=True)
    model, tok, arch = _load(tiny_llama_dir)
    one = key_statistics(model, tok, arch, _small(cache=False))
    ranked = torch.load(out)
    for l in one.layers:
        c, n = ranked[l]
        assert n == one.tokens(l)
        torch.testing.assert_close(c, one.second_moment(l), rtol=1e-5, atol=1e-7)


@pytest.mark.real_model
def test_real_model_statistics_and_disjointness(real_model, mzsre_dir, tmp_path):
    model, tok, arch = real_model
    cfg = KeyStatsConfig(languages=["en", "zh", "th"], tokens_per_language=60, max_length=32, cache_dir=str(tmp_path),
                         exclude=[str(mzsre_dir)])
    stats = key_statistics(model, tok, arch, cfg, layers=[0, 5])
    d_ff = model.config.intermediate_size
    assert stats.layers == [0, 5]
    for l in stats.layers:
        c = stats.second_moment(l).double()
        assert c.shape == (d_ff, d_ff)
        assert torch.equal(c, c.T)
        eig = torch.linalg.eigvalsh(c)
        assert eig[0] > -1e-6 * eig[-1]  # PSD up to rounding
        assert eig[-1] > 0
        assert torch.allclose(torch.diagonal(c), torch.diagonal(c).clamp(min=0))
    sample = json.loads((cache_folder(cfg, stats.metadata["model_fingerprint"]) / "sample.json").read_text())["sample"]
    texts = [t for v in sample.values() for t in v]
    assert texts and all(t.strip() for t in texts)
    assert len(texts) == 3 * 2  # ceil(60 / 31) passages per language
    # every position of every re-tokenised passage but the first is a key (decoding may merge a few tokens)
    keys = sum(min(len(tok(t, add_special_tokens=True)["input_ids"]), 32) - 1 for t in texts)
    assert stats.tokens(0) == stats.tokens(5) == keys and keys > 3 * 2 * 28
    guard = key_sample.NgramGuard(tok, key_sample.evaluation_strings([str(mzsre_dir)]), n=8)
    assert guard.shared(texts) == []
    ppl = key_sample.packaged_json("perplexity_sample.json")
    assert guard.overlaps("So it goes. " + ppl["de"][0])  # the rule does catch evaluation text
    # the projector of a real layer is a projector onto a non-empty low-energy subspace
    P = null_space_projector(stats.second_moment(5), 0.01, "energy")
    torch.testing.assert_close(P @ P, P, atol=1e-4, rtol=0)
    assert 1 <= round(float(torch.trace(P))) < d_ff
