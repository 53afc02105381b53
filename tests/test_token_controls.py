"""min_tokens, logit_bias, bad_words and allowed_token_ids: each does what it promises, in the
Sampler and end to end, alone and in one batch mixed with plain requests and adapters (whose
rows must not change)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import SEED, random_prompts
from lmq import LLM, SamplingParams
from lmq.sampling import Sampler, SamplerRow, banned_token_ids, with_bad_words_token_ids

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
RANDOM = SamplingParams(temperature=1.5, max_tokens=16, ignore_eos=True, seed=3)
EOS = 2  # the tiny models' eos_token_id


def _logits(rows: int, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(SEED + seed)) * 3


def _rows(params: list[SamplingParams], banned: list[list[int]] | None = None) -> list[SamplerRow]:
    return [SamplerRow(p, [], [], None, banned[i] if banned else []) for i, p in enumerate(params)]


# -- the Sampler ------------------------------------------------------------------------------
def test_logit_bias_plus_100_is_picked_minus_100_never():
    logits = _logits(6)
    low = logits.argmin(-1).tolist()
    top = logits.argmax(-1).tolist()
    params = [replace(GREEDY, logit_bias={low[0]: 100}), replace(RANDOM, logit_bias={low[1]: 100}),
              replace(GREEDY, logit_bias={top[2]: -100}), GREEDY, replace(GREEDY, logit_bias={str(low[4]): 100.0}),
              RANDOM]
    toks = Sampler()(logits.clone(), _rows(params)).token_ids
    assert toks[0] == low[0] and toks[1] == low[1] and toks[4] == low[4]
    assert toks[2] != top[2] and toks[3] == top[3]


def test_allowed_token_ids_restrict_every_draw():
    allowed = (3, 17, 40)
    logits = _logits(2000, seed=1)
    params = [replace(RANDOM, seed=None, allowed_token_ids=allowed)] * 1000 + [replace(RANDOM, seed=None)] * 1000
    toks = Sampler()(logits.clone(), _rows(params)).token_ids
    assert set(toks[:1000]) == set(allowed)  # all three drawn, nothing else
    assert len(set(toks[1000:])) > 10  # the plain rows of the same batch are not restricted
    greedy = Sampler()(logits[:1].clone(), _rows([replace(GREEDY, allowed_token_ids=allowed)])).token_ids[0]
    assert greedy == max(allowed, key=lambda t: logits[0, t].item())


def test_banned_tokens_are_never_drawn():
    logits = _logits(1000, seed=2)
    top = logits.argmax(-1).tolist()
    rows = _rows([replace(RANDOM, seed=None)] * 1000, banned=[[top[i], 5] for i in range(1000)])
    toks = Sampler()(logits.clone(), rows).token_ids
    assert all(t != top[i] and t != 5 for i, t in enumerate(toks))


def test_bad_words_rule_is_vllms():
    p = replace(GREEDY, bad_words_token_ids=((7,), (4, 5, 6)), min_tokens=3, stop_token_ids=(9,))
    assert sorted(banned_token_ids(p, [], frozenset({EOS}))) == [EOS, 7, 9]  # min_tokens: EOS and stop ids
    assert banned_token_ids(p, [1, 4, 5], frozenset({EOS})) == [7, 6]  # past min_tokens; 4 5 -> 6 banned
    assert banned_token_ids(p, [4, 1, 5], frozenset({EOS})) == [7]
    assert banned_token_ids(replace(p, min_tokens=0), [5], frozenset()) == [7]  # too short for 4 5 6

    spaced = with_bad_words_token_ids(replace(GREEDY, bad_words=("fox",)), {"fox": [10], " fox": [11]}.get)
    assert spaced.bad_words_token_ids == ((10,), (11,))
    split = with_bad_words_token_ids(replace(GREEDY, bad_words=(" fox",)), {"fox": [10], " fox": [12, 10]}.get)
    assert split.bad_words_token_ids == ((10,),)  # " fox" = " " + "fox": the plain ban covers it


@pytest.mark.parametrize("field, value, words", [
    ("min_tokens", -1, ">= 0"), ("min_tokens", 20, "<= max_tokens=16"), ("logit_bias", {5: 101}, "[-100, 100]"),
    ("logit_bias", {"x": 1}, "non-negative integer"), ("allowed_token_ids", [], "non-empty"),
    ("allowed_token_ids", [-1], "non-negative"), ("bad_words", [" "], "non-blank"),
])
def test_invalid_values_name_field_limit_and_value(field, value, words):
    with pytest.raises(ValueError, match=rf"^{field}") as e:
        replace(GREEDY, **{field: value})
    assert words in str(e.value) and "is invalid" in str(e.value)


# -- end to end ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm(tiny_models, lora_adapters) -> LLM:
    return LLM(str(tiny_models["llama"]), device="cpu", dtype="float32", kv_cache_gb=0.05,
               adapters={k: lora_adapters[k] for k in ("qv4", "all8")})


def _toks(llm: LLM, prompt, params: SamplingParams, adapter: str | None = None) -> list[int]:
    return llm.generate(prompt, params, adapter=adapter)[0].outputs[0].token_ids


def _banned(llm: LLM, words: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    params = replace(GREEDY, bad_words=words)
    return with_bad_words_token_ids(params, lambda w: llm.tokenizer.encode(w, False)).bad_words_token_ids


def _words(llm: LLM, tokens: list[int], width: int) -> tuple[str, tuple[int, ...], int]:
    """A piece of `tokens`, `width` tokens long, whose text as a bad word bans exactly that
    piece (random models emit bytes that decode to no text, or re-encode differently)."""
    for i in range(len(tokens) - width + 1):
        piece = tuple(tokens[i:i + width])
        text = llm.tokenizer.decode(list(piece))
        if text.strip() and "\ufffd" not in text and piece in _banned(llm, (text,)):
            return text, piece, i
    pytest.skip("no re-encodable piece in this output")


def _prompt_with_word(llm: LLM, seed: int, adapter: str | None = None, upto: int | None = None):
    """(prompt, greedy tokens, word, its tokens, where) for the first of a few prompts whose
    greedy output (up to `upto` tokens) holds a one-token piece usable as a word."""
    for prompt in random_prompts(8, [4, 11, 30], seed=seed):
        ref = _toks(llm, prompt, GREEDY, adapter)
        try:
            return (prompt, ref, *_words(llm, ref[:upto], 1))
        except pytest.skip.Exception:
            continue
    pytest.fail("no prompt whose output holds a re-encodable token")


def _contains(seq: list[int], piece: tuple[int, ...]) -> bool:
    return any(tuple(seq[i:i + len(piece)]) == piece for i in range(len(seq) - len(piece) + 1))


def test_vocab_limits_are_checked(llm):
    for field, value in [("logit_bias", {384: 1}), ("allowed_token_ids", [5, 384])]:
        with pytest.raises(ValueError, match=rf"{field}: token id 384 is out of range \[0, 384\)"):
            llm.generate([5, 6], replace(GREEDY, **{field: value}))


def test_bad_words_never_appear(llm):
    prompts = ["The quick brown fox", "What is the capital of France?", *random_prompts(4, [5, 20], seed=61)]
    tested = 0
    for prompt in prompts:  # a one-token word, out of the model's own greedy output
        ref = _toks(llm, prompt, replace(GREEDY, max_tokens=24))
        try:
            word, piece, _ = _words(llm, ref, 1)
        except pytest.skip.Exception:
            continue
        out = _toks(llm, prompt, replace(GREEDY, max_tokens=24, bad_words=(word,)))
        banned = _banned(llm, (word,))
        assert out != ref and not any(_contains(out, b) for b in banned), (word, banned, out)
        tested += 1
    assert tested >= 2


def test_multi_token_bad_words_ban_the_last_token_after_the_others(llm):
    """Output restricted to a word's two tokens a, b: with the word banned, b never follows a
    (and a, b still appear)."""
    from conftest import CORPUS

    for word in sorted({w.strip(".?,") for line in CORPUS for w in line.split()}):
        ids = tuple(llm.tokenizer.encode(word, False))
        if len(ids) != 2 or ids[0] == ids[1] or ids not in _banned(llm, (word,)):
            continue
        for prompt in random_prompts(4, [6, 13], seed=63):
            only = replace(GREEDY, max_tokens=24, allowed_token_ids=ids)
            if not _contains(_toks(llm, prompt, only), ids):
                continue
            out = _toks(llm, prompt, replace(only, bad_words=(word,)))
            assert not _contains(out, ids) and set(out) <= set(ids), (word, out)
            return
    pytest.fail("no two-token word whose tokens the model puts in order")


def test_min_tokens_holds_back_eos_and_stop_tokens(llm):
    prompt = [5, 6, 7]
    forced = SamplingParams(temperature=0.0, max_tokens=16, logit_bias={EOS: 100})
    assert _toks(llm, prompt, forced) == [EOS]  # EOS at once
    out = llm.generate(prompt, replace(forced, min_tokens=5))[0].outputs[0]
    assert len(out.token_ids) == 6 and EOS not in out.token_ids[:5] and out.token_ids[5] == EOS
    assert out.finish_reason == "stop"
    ref = _toks(llm, prompt, GREEDY)
    stop = replace(GREEDY, stop_token_ids=(ref[0],))
    assert _toks(llm, prompt, stop) == ref[:1]
    held = llm.generate(prompt, replace(stop, min_tokens=4))[0].outputs[0]
    assert ref[0] not in held.token_ids[:4] and len(held.token_ids) >= 4


def test_min_tokens_holds_back_stop_strings(llm):
    prompt, _, word, _, at = _prompt_with_word(llm, seed=64, upto=-1)
    cut = llm.generate(prompt, replace(GREEDY, stop=(word,)))[0].outputs[0]
    assert cut.finish_reason == "stop" and len(cut.token_ids) <= at + 1
    late = llm.generate(prompt, replace(GREEDY, stop=(word,), min_tokens=len(cut.token_ids)))[0].outputs[0]
    assert len(late.token_ids) > len(cut.token_ids)


def test_a_mixed_batch_keeps_every_promise_and_leaves_plain_rows_alone(llm):
    prompts = random_prompts(6, [4, 11, 30], seed=62)
    names = [None, "qv4", "all8", None, "qv4", "all8"]
    prompts[4], _, word, piece, _ = _prompt_with_word(llm, seed=65, adapter="qv4")
    ref = [_toks(llm, p, GREEDY, a) for p, a in zip(prompts, names)]
    allowed = (ref[1][0], 17, 99)
    params = [
        GREEDY,
        replace(GREEDY, allowed_token_ids=allowed),
        replace(GREEDY, logit_bias={7: 100}),
        replace(GREEDY, ignore_eos=False, min_tokens=6, logit_bias={EOS: 100}),
        replace(GREEDY, bad_words=(word,)),
        GREEDY,
    ]
    alone = [_toks(llm, p, sp, a) for p, sp, a in zip(prompts, params, names)]
    outs = [o.outputs[0].token_ids for o in llm.generate(prompts, params, adapter=names)]
    assert outs == alone  # batch-invariant, adapters included
    assert outs[0] == ref[0] and outs[5] == ref[5]
    assert set(outs[1]) <= set(allowed) and outs[1][0] == ref[1][0]
    assert outs[2] == [7] * 16
    assert len(outs[3]) == 7 and outs[3][-1] == EOS and EOS not in outs[3][:6]
    banned = _banned(llm, (word,))
    assert piece in banned and not any(_contains(outs[4], b) for b in banned) and outs[4] != ref[4]
    bm = llm.engine.block_manager
    bm.check_integrity()
    assert bm.num_free_blocks == bm.num_blocks
