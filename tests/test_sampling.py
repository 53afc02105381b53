"""Sampling: SamplingParams validation, the batched Sampler against independent torch and
transformers references, and end to end on a tiny Llama: seeds, n > 1, stops, lengths, logprobs."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import pytest
import torch

from conftest import SEED, random_prompts
from lmq import LLM, SamplingParams
from lmq.sampling import Sampler, SamplerRow, apply_penalties, counter_exponentials, step_seed

N_DRAWS = 40_000  # frequency std <= 0.0025, so 0.02 is > 8 sigma


def _logits(rows: int, vocab: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(SEED + seed)) * scale


def _sample(logits: torch.Tensor, params: SamplingParams, prompt: list[int] | None = None,
            outs: list[list[int]] | None = None, seeds: list[int] | None = None,
            keys: list[int] | None = None) -> list[int]:
    """seeds: an explicit torch.Generator per row; keys: the engine's form, a step_seed per row."""
    rows = [SamplerRow(params, prompt or [1], outs[i] if outs else [],
                       torch.Generator().manual_seed(seeds[i]) if seeds else None,
                       seed=keys[i] if keys else None) for i in range(len(logits))]
    return Sampler()(logits.clone(), rows).token_ids


def _freqs(row: torch.Tensor, params: SamplingParams, seeded: str | None = None) -> torch.Tensor:
    """seeded: None (the engine's generator), "generator" (one per row) or "key" (step_seed keys)."""
    draws = list(range(N_DRAWS))
    toks = _sample(row.expand(N_DRAWS, -1), params, seeds=draws if seeded == "generator" else None,
                   keys=[step_seed(SEED, i) for i in draws] if seeded == "key" else None)
    return torch.bincount(torch.tensor(toks), minlength=row.numel()).double() / N_DRAWS


def _reference(row: torch.Tensor, temp: float = 1.0, top_k: int = -1, top_p: float = 1.0,
               min_p: float = 0.0) -> torch.Tensor:
    """vLLM/HF semantics, written independently: min_p, then top_k, then top_p over the
    renormalized top-k mass (the smallest prefix reaching top_p). Returns the kept distribution."""
    probs = (row.double() / temp).softmax(-1)
    order = [t for t in probs.argsort(descending=True).tolist() if probs[t] >= min_p * probs.max()]
    order = order[:top_k] if top_k > 0 else order
    mass, kept, total = 0.0, [], sum(probs[t].item() for t in order)
    for t in order:
        kept.append(t)
        mass += probs[t].item() / total
        if mass >= top_p:
            break
    out = torch.zeros_like(probs)
    out[kept] = probs[kept]
    return out / out.sum()


# -- SamplingParams ---------------------------------------------------------------------------
INVALID = [("n", 0, ">= 1"), ("temperature", -1, "[0, 100]"), ("top_p", 0, "(0, 1]"), ("top_p", 1.5, "(0, 1]"),
           ("top_k", -2, ">= 1"), ("min_p", 1.5, "[0, 1]"), ("repetition_penalty", 0, "(0, 10]"),
           ("presence_penalty", 3, "[-2, 2]"), ("frequency_penalty", -3, "[-2, 2]"), ("max_tokens", 0, ">= 1"),
           ("logprobs", 21, "[0, 20]"), ("seed", "x", "integer"), ("stop", [""], "non-empty strings"),
           # Non-integers must not pass the range checks (logprobs=2.5 would crash the sampler mid-step),
           # nor seeds a torch.Generator cannot take (it would fail in the engine thread).
           ("logprobs", 2.5, "[0, 20]"), ("prompt_logprobs", 1.5, "[0, 20]"), ("max_tokens", 2.5, ">= 1"),
           ("seed", 2**64, "[-2^63, 2^63)")]


@pytest.mark.parametrize(("name", "value", "allowed"), INVALID, ids=[f"{n}={v!r}" for n, v, _ in INVALID])
def test_invalid_params_name_field_value_and_range(name, value, allowed):
    with pytest.raises(ValueError) as err:
        SamplingParams(**{name: value})
    shown = repr(tuple(value)) if isinstance(value, list) else repr(value)
    assert f"{name}={shown}" in str(err.value) and allowed in str(err.value), str(err.value)


def test_boundary_params_are_valid():
    SamplingParams(n=1, temperature=0, top_p=1, top_k=0, min_p=1, repetition_penalty=10, presence_penalty=-2,
                   frequency_penalty=2, max_tokens=1, logprobs=20, seed=0, stop="x", stop_token_ids=[0])
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b") and SamplingParams(top_k=-1).top_k == -1


# -- Sampler units ----------------------------------------------------------------------------
def test_greedy_is_argmax():
    logits = _logits(32, 100, seed=1)
    assert _sample(logits, SamplingParams(temperature=0)) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("params", [SamplingParams(top_k=1, temperature=t) for t in (0.3, 1.0, 7.0, 100.0)]
                         + [SamplingParams(top_p=1e-6, temperature=t) for t in (1.0, 5.0)]
                         + [SamplingParams(min_p=1.0, temperature=t) for t in (1.0, 5.0)],
                         ids=lambda p: f"k{p.top_k}-p{p.top_p}-minp{p.min_p}-t{p.temperature}")
def test_degenerate_filters_equal_greedy(params):
    logits = _logits(64, 100, seed=2)
    assert _sample(logits, params) == logits.argmax(-1).tolist()
    assert _sample(logits, params, seeds=list(range(64))) == logits.argmax(-1).tolist()


@pytest.mark.parametrize(("temp", "top_k", "top_p", "min_p"),
                         [(1.0, -1, 1.0, 0.0), (0.7, -1, 1.0, 0.0), (1.0, 5, 1.0, 0.0), (0.8, 3, 1.0, 0.0),
                          (1.0, -1, 0.6, 0.0), (1.5, -1, 0.8, 0.0), (1.0, -1, 1.0, 0.2)])
@pytest.mark.parametrize("seeded", [None, "generator", "key"])
def test_samples_follow_filtered_softmax(temp, top_k, top_p, min_p, seeded):
    row = _logits(1, 32, seed=3, scale=1.5)[0]
    ref = _reference(row, temp, top_k, top_p, min_p)
    got = _freqs(row, SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p), seeded)
    assert set(got.nonzero().flatten().tolist()) <= set(ref.nonzero().flatten().tolist())  # inside the kept set
    assert (got - ref).abs().max() < 0.02


def test_top_p_applies_to_mass_renormalized_after_top_k():
    # probs 0.32, 0.28, 4 x 0.10. vLLM and HF: top_k=2 leaves 0.53 / 0.47, so top_p=0.5 keeps only
    # token 0 (measured against the unfiltered mass, 0.32 < 0.5, both would stay).
    row = torch.tensor([0.32, 0.28, 0.1, 0.1, 0.1, 0.1]).log()
    assert _reference(row, top_k=2, top_p=0.5).nonzero().flatten().tolist() == [0]
    assert set(_sample(row.expand(2000, -1), SamplingParams(top_k=2, top_p=0.5))) == {0}


def test_seeded_row_ignores_the_rest_of_the_batch():
    logits = _logits(8, 64, seed=4, scale=0.5)
    alone = [_sample(logits[:1], SamplingParams(), seeds=[99]) for _ in range(2)]
    mixed = SamplingParams(temperature=0.5, top_k=10)
    rows = [SamplerRow(mixed, [1], [], None) for _ in range(7)] + [SamplerRow(SamplingParams(), [1], [],
                                                                             torch.Generator().manual_seed(99))]
    in_batch = Sampler()(torch.cat([logits[1:], logits[:1]]), rows).token_ids[-1]
    assert alone[0] == alone[1] == [in_batch]
    # the engine's form: a step_seed key, drawn with the other keyed rows in one batched op
    key = step_seed(99, 3)
    alone = [_sample(logits[:1], SamplingParams(), keys=[key]) for _ in range(2)]
    rows = [SamplerRow(mixed, [1], [], None, seed=step_seed(i, 3)) for i in range(7)]
    rows.append(SamplerRow(SamplingParams(), [1], [], None, seed=key))
    in_batch = Sampler()(torch.cat([logits[1:], logits[:1]]), rows).token_ids[-1]
    assert alone[0] == alone[1] == [in_batch]


def _splitmix64(state: int, i: int) -> int:
    """The i-th output (from 1) of splitmix64 started at `state`, in Python's unbounded ints:
    the reference for the wrapping int64 tensor arithmetic of counter_exponentials."""
    m = (1 << 64) - 1
    z = (state + i * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def test_counter_exponentials_are_splitmix64_and_exp1():
    keys = [step_seed(SEED + k, k) for k in range(6)] + [0, 2**64 - 1]
    signed = torch.tensor([k - 2**64 if k >= 2**63 else k for k in keys])
    q = counter_exponentials(signed, 4000).double()
    for r, key in enumerate(keys):
        for v in (0, 1, 1234, 3999):
            u = ((_splitmix64(key, v + 1) >> 41) + 0.5) * 2.0**-23
            assert q[r, v].item() == pytest.approx(-math.log(u), rel=1e-6), (r, v)
    # Exp(1): mean 1, variance 1, P(q > 1) = 1/e (32,000 draws: std 0.0056, 0.011, 0.0026)
    assert abs(q.mean().item() - 1) < 0.03 and abs(q.var().item() - 1) < 0.06
    assert abs((q > 1).double().mean().item() - math.exp(-1)) < 0.015
    assert torch.equal(counter_exponentials(signed[2:5], 4000), q[2:5].float())  # rows do not interact


def test_backend_race_gets_every_row_keyed():
    """A backend's one-op draw (`Sampler(race=...)`, turbomind's sample.cu) gets each seeded
    row's step_seed as its key, and keys drawn from the engine's generator for the others: here a
    torch race in log space stands in for the kernel and must pick what the sampler's own path
    picks for the seeded rows; unseeded rows repeat with the generator's seed."""
    def race(logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return (logits - counter_exponentials(keys, logits.shape[1]).log()).argmax(-1)

    logits = _logits(64, 300, seed=9)
    params = [SamplingParams(temperature=0.8, seed=i) if i % 2 else SamplingParams(temperature=0.8, top_k=20)
              for i in range(64)]
    rows = [SamplerRow(p, [1], [], seed=step_seed(p.seed, 0) if p.seed is not None else None) for p in params]
    own = Sampler()(logits.clone(), rows).token_ids
    runs = [Sampler(torch.Generator().manual_seed(5), race=race)(logits.clone(), rows).token_ids for _ in range(2)]
    assert runs[0] == runs[1]
    assert [t for i, t in enumerate(runs[0]) if i % 2] == [t for i, t in enumerate(own) if i % 2]


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    from transformers import RepetitionPenaltyLogitsProcessor

    vocab, logits = 50, _logits(4, 50, seed=5)
    logits[:, :3] = 0.0  # the sign boundary
    ids = random_prompts(8, [6, 11, 3, 9], seed=6, vocab=vocab)
    prompts, outs = ids[:4], ids[4:]
    params = SamplingParams(repetition_penalty=penalty, temperature=0)
    rows_ids = list(zip(prompts, outs))
    rows = [SamplerRow(params, p, o) for p, o in rows_ids]
    got = apply_penalties(logits.clone(), rows)
    proc = RepetitionPenaltyLogitsProcessor(penalty)
    ref = torch.cat([proc(torch.tensor([p + o]), logits[i:i + 1].clone()) for i, (p, o) in enumerate(rows_ids)])
    torch.testing.assert_close(got, ref)
    assert Sampler()(logits.clone(), rows).token_ids == ref.argmax(-1).tolist()


@pytest.mark.parametrize(("presence", "frequency"), [(0.7, 0.0), (0.0, 1.1), (-1.5, 0.4), (2.0, -2.0)])
def test_presence_frequency_penalties_follow_openai(presence, frequency):
    logits = _logits(3, 40, seed=7)
    prompt = list(range(10, 20))  # never penalized by these two
    outs = [[1, 1, 1, 5, 9, 5], [], [30, 12, 30, 2]]
    params = SamplingParams(presence_penalty=presence, frequency_penalty=frequency, temperature=0)
    ref = logits.clone()
    for i, out in enumerate(outs):
        for tok, count in Counter(out).items():
            ref[i, tok] -= frequency * count + presence * (count > 0)
    got = apply_penalties(logits.clone(), [SamplerRow(params, prompt, o) for o in outs])
    torch.testing.assert_close(got, ref)
    assert _sample(logits, params, prompt=prompt, outs=outs) == ref.argmax(-1).tolist()


@pytest.mark.parametrize("k", [0, 1, 5, 20])
@pytest.mark.parametrize("params", [SamplingParams(temperature=0), SamplingParams(temperature=1.3, top_k=10),
                                    SamplingParams(temperature=0.8, repetition_penalty=1.5, frequency_penalty=1)])
def test_logprobs_are_raw_log_softmax_with_ranks(k, params):
    params, logits = replace(params, logprobs=k), _logits(16, 60, seed=8)
    rows = [SamplerRow(params, [3, 4], [5, 5, 6]) for _ in range(16)]
    out = Sampler()(logits.clone(), rows)
    ref = logits.log_softmax(-1)
    for i, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        top = ref[i].topk(k).indices.tolist() if k else []
        assert set(entry) == set(top) | {tok}  # the sampled token and k alternatives
        for t, lp in entry.items():
            assert abs(lp.logprob - ref[i, t].item()) < 1e-6
            assert lp.rank == int((ref[i] > ref[i, t]).sum()) + 1
        if params.greedy and not params.needs_penalties:
            assert entry[tok].rank == 1


# -- end to end -------------------------------------------------------------------------------
SEEDED = SamplingParams(seed=1234, temperature=0.9, top_p=0.95, max_tokens=24, ignore_eos=True)
# Greedy, but the penalties keep a random model from looping on one token: distinct tokens.
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, presence_penalty=2, frequency_penalty=2)


@pytest.fixture
def llm(tiny_models):
    llm = LLM(str(tiny_models["llama"]), device="cpu", dtype="float32", kv_cache_gb=0.05)
    yield llm
    bm = llm.engine.block_manager
    bm.check_integrity()
    assert bm.num_free_blocks == bm.num_blocks and not llm.engine.has_unfinished()


def _plain(text: str) -> bool:
    return text.strip() != "" and text.isascii() and text.isprintable()


def _toks(outs) -> list[list[int]]:
    return [c.token_ids for o in outs for c in o.outputs]


def test_seeded_request_independent_of_batch_and_order(llm):
    prompts = random_prompts(8, [40, 5, 17, 64, 1, 33, 9, 100], seed=20)
    others = [SamplingParams(temperature=1.0, max_tokens=m) for m in (3, 30, 7)] + \
             [SamplingParams(seed=s, temperature=0.7, top_k=20, max_tokens=m) for s, m in ((1, 12), (1234, 40))] + \
             [SamplingParams(temperature=0, max_tokens=5), SamplingParams(seed=1234, top_p=0.5, max_tokens=20)]
    alone = _toks(llm.generate(prompts[:1], SEEDED))[0]
    batch = _toks(llm.generate(prompts, [SEEDED] + others))
    reordered = _toks(llm.generate(prompts[::-1], ([SEEDED] + others)[::-1]))
    assert len(alone) == 24 and batch[0] == alone and reordered[-1] == alone
    # A chunked-prefill engine (16-token budget) mixes prompt chunks with decodes: same tokens.
    chunked = LLM(str(llm.engine.config.model.path), device="cpu", dtype="float32", kv_cache_gb=0.05,
                  max_num_batched_tokens=16)
    assert _toks(chunked.generate(prompts[::-1], ([SEEDED] + others)[::-1]))[-1] == alone
    chunked.engine.block_manager.check_integrity()
    assert chunked.engine.block_manager.num_free_blocks == chunked.engine.block_manager.num_blocks
    other_seed = _toks(llm.generate(prompts[:1], replace(SEEDED, seed=4321)))[0]
    assert other_seed != alone


def test_n_samples_share_prompt_blocks_and_reproduce(llm):
    eng, bm = llm.engine, llm.engine.block_manager
    prompt = random_prompts(1, [40], seed=21)[0]  # 2 full blocks of 16 + 8 tokens
    params = SamplingParams(n=3, seed=7, temperature=1.0, max_tokens=10, ignore_eos=True)
    eng.add_request("n3", prompt, params)
    outs = eng.step()  # the prompt fits one step: sample 0 forks into 3
    seqs = eng.requests["n3"].seqs
    tables = [bm.block_table(s.seq_id) for s in seqs]
    full = len(prompt) // bm.block_size
    assert len(seqs) == 3 and all(t[:full] == tables[0][:full] for t in tables)
    assert all(bm.blocks[b].ref_count == 3 for b in tables[0][:full])
    bm.check_integrity()
    while eng.has_unfinished():
        outs += eng.step()
        tails = [bm.block_table(s.seq_id)[full:] for s in seqs if not s.is_finished]
        assert len({b for t in tails for b in t}) == sum(map(len, tails))  # private tails
        bm.check_integrity()
    first = [c.token_ids for c in outs[-1].outputs]
    assert outs[-1].finished and [c.index for c in outs[-1].outputs] == [0, 1, 2]
    assert all(len(t) == 10 for t in first) and len({tuple(t) for t in first}) == 3
    again = llm.generate([prompt, prompt], params)  # prefix-cache hits, two requests at once
    assert [_toks([o]) for o in again] == [first, first]


def test_stop_token_ids_and_eos(llm):
    prompt = "The capital of France"
    ref = _toks(llm.generate(prompt, GREEDY))[0]
    i = next(i for i in range(2, len(ref)) if _plain(llm.tokenizer.decode([ref[i]])))
    out = llm.generate(prompt, replace(GREEDY, stop_token_ids=(ref[i],)))[0].outputs[0]
    assert out.token_ids == ref[:i + 1] and out.finish_reason == "stop" and out.stop_reason == ref[i]
    llm.engine.eos_token_ids = frozenset({ref[i]})  # make the model "emit EOS" at position i
    eos = llm.generate(prompt, replace(GREEDY, ignore_eos=False))[0].outputs[0]
    assert eos.token_ids == ref[:i + 1] and (eos.finish_reason, eos.stop_reason) == ("stop", None)
    ignored = llm.generate(prompt, GREEDY)[0].outputs[0]
    assert ignored.token_ids == ref and ignored.finish_reason == "length"
    # As in vLLM, a stop token's text is left out unless include_stop_str_in_output.
    texts = [llm.generate(prompt, replace(GREEDY, max_tokens=m))[0].outputs[0].text for m in (i, i + 1)]
    kept = llm.generate(prompt, replace(GREEDY, stop_token_ids=(ref[i],), include_stop_str_in_output=True))
    assert kept[0].outputs[0].text == texts[1]
    assert out.text == texts[0], (out.text, texts)


def test_stop_strings_truncate_text(llm):
    # The first prompt whose greedy text has a plain 2-character piece, first seen past its start.
    for prompt in ["What is the capital", *random_prompts(8, [4, 9, 23], seed=24)]:
        full = llm.generate(prompt, GREEDY)[0].outputs[0]
        text = full.text
        cut = next((c for c in range(1, len(text) - 2) if _plain(text[c:c + 2]) and text.find(text[c:c + 2]) == c),
                   None)
        if cut is not None:
            break
    assert cut is not None, "no usable stop string in 9 greedy texts"
    stop = text[cut:cut + 2]
    for include in (False, True):
        params = replace(GREEDY, stop=["<never seen>", stop], include_stop_str_in_output=include)
        out = llm.generate(prompt, params)[0].outputs[0]
        assert out.text == text[:cut + (len(stop) if include else 0)], (stop, text)
        assert (out.finish_reason, out.stop_reason) == ("stop", stop)
        assert out.token_ids == full.token_ids[:len(out.token_ids)] and len(out.token_ids) < GREEDY.max_tokens


@pytest.mark.parametrize("max_tokens", [1, 7, 20])
def test_max_tokens_finishes_with_length(llm, max_tokens):
    prompts = random_prompts(4, [3, 16, 31], seed=22)
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=1.0, n=2))
    for c in (c for o in outs for c in o.outputs):
        assert len(c.token_ids) == max_tokens and c.finish_reason == "length" and c.stop_reason is None


@pytest.mark.parametrize("params", [SamplingParams(temperature=0, logprobs=5, max_tokens=12, ignore_eos=True),
                                    SamplingParams(seed=3, temperature=1.2, logprobs=3, max_tokens=12,
                                                   ignore_eos=True)], ids=["greedy", "seeded"])
def test_logprobs_through_generate(llm, tiny_models, params):
    from transformers import AutoModelForCausalLM

    prompt = random_prompts(1, [21], seed=23)[0]
    out = llm.generate(prompt, params)[0].outputs[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
    assert len(out.logprobs) == len(out.token_ids) == 12
    for j, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        top = ref[j].topk(params.logprobs)
        # The same top-k set, except that tokens tied with the k-th within float error may swap.
        kth = top.values[-1].item() if params.logprobs else float("inf")
        assert all(abs(ref[j, t].item() - kth) < 1e-4
                   for t in set(top.indices.tolist()) ^ (set(entry) - {tok}) if t != tok)
        assert abs(entry[tok].logprob - ref[j, tok].item()) < 1e-4
        assert entry[tok].rank == int((ref[j] > ref[j, tok]).sum()) + 1
        assert not params.greedy or entry[tok].rank == 1
    assert abs(out.cumulative_logprob - sum(e[t].logprob for e, t in zip(out.logprobs, out.token_ids))) < 1e-5
