"""One prefill per prompt, then targets and greedy continuations from its cache:
the same results as a full forward pass per row and ``generate`` per prompt."""

from __future__ import annotations

import pytest
import torch

from mke_lightning.modeling.forward import kept_logits, pack, target_logprobs, token_accuracy
from mke_lightning.modeling.prefix_scoring import greedy_continue, prefill, score_and_continue, score_targets

VOCAB = 48
PAD = 0


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, eos_token_id=2, bos_token_id=1,
    ))


def _gemma3(window: int):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=window, layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=64, pad_token_id=PAD, eos_token_id=2, bos_token_id=1,
    ))


def _gemma3_short_window():  # 3 tokens: every row here is longer, so targets are scored apart
    return _gemma3(3)


def _gemma3_long_window():  # 48 tokens: every row fits, so continuations follow the targets' pass
    return _gemma3(48)


def _gpt2():  # learned absolute positions: position ids must follow each row's own length
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=PAD))


@pytest.fixture(params=[_llama, _gemma3_short_window, _gemma3_long_window, _gpt2],
                ids=["llama", "gemma3-window3", "gemma3-window48", "gpt2"])
def model(request):
    torch.manual_seed(0)
    return request.param().eval()


def _prompts_and_targets(seed: int = 1):
    g = torch.Generator().manual_seed(seed)

    def rand(n):
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    prompts = [[1, *rand(n)] for n in (4, 9, 6, 12)]
    rows = [(0, rand(1)), (0, rand(3)), (1, rand(5)), (2, rand(2)), (3, rand(4)), (3, rand(1)), (1, rand(2))]
    return prompts, rows


def test_targets_score_as_a_full_forward_pass_per_row(model):
    prompts, rows = _prompts_and_targets()
    pre = prefill(model, prompts, PAD)
    got = score_targets(model, pre, [u for u, _ in rows], [t for _, t in rows], batch_rows=3)  # 3 chunks
    assert len(got) == len(rows)
    for (u, target), score in zip(rows, got):
        b = pack([prompts[u]], [target], PAD)
        with torch.no_grad():
            logits = kept_logits(model, b)  # [1, K, V]
        assert score.predicted == logits.argmax(-1)[0].tolist()
        assert score.accuracy == pytest.approx(float(token_accuracy(logits, b)[0]))
        assert score.mean_logprob == pytest.approx(float(target_logprobs(logits, b).sum()) / len(target), abs=1e-5)
    # the prefill is left as it was: scoring again gives the same
    again = score_targets(model, pre, [u for u, _ in rows], [t for _, t in rows])
    assert [s.predicted for s in again] == [s.predicted for s in got]


def _generate_one(model, prompt: list[int], width: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=width, do_sample=False,
                             pad_token_id=PAD, eos_token_id=None, top_p=None, top_k=None, temperature=None)
    return out[0, len(prompt):].tolist()


def test_greedy_continuation_equals_generate_per_prompt(model):
    prompts, _ = _prompts_and_targets()
    widths = [5, 0, 3, 7]
    got = greedy_continue(model, prefill(model, prompts, PAD), widths, end_ids=set(), pad_id=PAD)
    for prompt, width, gen in zip(prompts, widths, got):
        assert gen == (_generate_one(model, prompt, width) if width else [])


def test_each_row_stops_at_its_own_end_token(model):
    prompts, _ = _prompts_and_targets(seed=3)
    free = greedy_continue(model, prefill(model, prompts, PAD), [6] * 4, end_ids=set(), pad_id=PAD)
    end = free[2][2]  # a token the model does produce: row 2 stops at its third step at the latest

    def cut(row, keep):
        return next((row[: i + keep] for i, t in enumerate(row) if t == end), row)

    dropped = greedy_continue(model, prefill(model, prompts, PAD), [6] * 4, end_ids={end}, pad_id=PAD)
    kept = greedy_continue(model, prefill(model, prompts, PAD), [6] * 4, end_ids={end}, pad_id=PAD, keep_end=True)
    assert dropped == [cut(r, 0) for r in free]
    assert kept == [cut(r, 1) for r in free]
    first = free[2].index(end)
    assert len(dropped[2]) == first < 6 and kept[2] == free[2][: first + 1]


def test_width_list_must_match_the_prompts(model):
    prompts, _ = _prompts_and_targets()
    with pytest.raises(ValueError, match="widths"):
        greedy_continue(model, prefill(model, prompts, PAD), [3], end_ids=set(), pad_id=PAD)


def _full_forward_score(model, prompt: list[int], target: list[int]):
    b = pack([prompt], [target], PAD)
    with torch.no_grad():
        logits = kept_logits(model, b)  # [1, K, V]
    return (logits.argmax(-1)[0].tolist(), float(token_accuracy(logits, b)[0]),
            float(target_logprobs(logits, b).sum()) / len(target))


def test_continuations_that_follow_a_target_equal_generate(model):
    """Targets the greedy path follows wholly, in part or not at all, and none."""
    prompts, _ = _prompts_and_targets(seed=5)
    widths = [6, 6, 5, 4]
    own = [_generate_one(model, p, w) for p, w in zip(prompts, widths)]

    def wrong(t):
        return 3 + (t - 2) % (VOCAB - 3)  # any other ordinary token

    targets = [
        own[0][:4],                       # followed to its end, then two more tokens
        own[1][:2] + [wrong(own[1][2])],  # followed for two tokens, then it departs
        [wrong(own[2][0]), own[2][1]],    # departs at once
        [],                               # no target: plain decoding
    ]
    scores, gens = score_and_continue(model, prefill(model, prompts, PAD), targets, widths, end_ids=set(), pad_id=PAD)
    assert gens == own
    assert scores[3] is None
    for u in range(3):
        predicted, acc, mean_lp = _full_forward_score(model, prompts[u], targets[u])
        assert scores[u].predicted == predicted
        assert scores[u].accuracy == pytest.approx(acc)
        assert scores[u].mean_logprob == pytest.approx(mean_lp, abs=1e-5)
    assert scores[0].accuracy == 1.0 and scores[1].accuracy < 1.0


def test_a_followed_target_stops_at_an_end_token_inside_it(model):
    prompts, _ = _prompts_and_targets(seed=7)
    own = [_generate_one(model, p, 5) for p in prompts]
    end = own[0][1]  # the second token of row 0 ends the row: inside its target, which the path follows
    first = own[0].index(end)
    targets = [own[0][:4], own[1][:3], [], own[3][:1]]
    _, gens = score_and_continue(
        model, prefill(model, prompts, PAD), targets, [5] * 4, end_ids={end}, pad_id=PAD, keep_end=True
    )

    def cut(row):
        return next((row[: i + 1] for i, t in enumerate(row) if t == end), row)

    assert gens == [cut(r) for r in own]
    assert gens[0] == own[0][: first + 1]


def test_the_lm_head_gets_a_contiguous_input_and_the_same_logits():
    from mke_lightning.modeling.loading import contiguous_head_input

    torch.manual_seed(0)
    model = _llama().eval()
    ids = torch.randint(3, VOCAB, (3, 7))
    with torch.no_grad():
        before = model(input_ids=ids, logits_to_keep=2).logits
    seen = []
    contiguous_head_input(model)
    contiguous_head_input(model)  # a second call adds nothing
    model.get_output_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        after = model(input_ids=ids, logits_to_keep=2).logits
    assert seen == [True]
    assert len(model.get_output_embeddings()._forward_pre_hooks) == 2
    torch.testing.assert_close(after, before)
