"""xgrammar against llguidance, for lmq's structured output, on the built-in model's tokenizer
(SmolLM2-135M, 49,152 tokens):

    pip install --no-deps xgrammar apache-tvm-ffi   # once: xgrammar is not an lmq dependency
    python bench/structured_libs.py [--schemas 40] [--regexes 40] [--seed 0]

For every random JSON schema (tests/schema_fixtures.py: nested objects, arrays with
min/maxItems, enums, bounded integers and numbers, required fields, strings with pattern /
maxLength) and regex, each library compiles the grammar for the tokenizer (timed, caches off),
then walks it: fill the next-token bitmask (timed), draw a random allowed token, advance, until
the grammar ends or 200 tokens. Every finished walk's text must validate (`jsonschema` /
`re.fullmatch`); the counts of invalid and unfinished walks are the correctness figure, with
a few fixed probes (`PROBES`) of JSON-string rules random walks rarely reach.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

import _paths  # noqa: F401  (first: see its docstring)
import jsonschema
import torch
from transformers import AutoTokenizer

from lmq.weights import resolve_model

sys.path.append(str(Path(__file__).resolve().parent.parent / "tests"))
from schema_fixtures import random_regex, random_schema  # noqa: E402

MAX_WALK = 200


def allowed_ids(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    bits = (bitmask[:, None] >> torch.arange(32, dtype=torch.int32)) & 1  # [W, 32]
    return bits.flatten()[:vocab].nonzero().flatten()


class XGrammar:
    name = "xgrammar"

    def __init__(self, hf, vocab: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self.mask = xgr.allocate_token_bitmask(1, vocab)

    def compile(self, kind: str, spec):
        if kind == "json":
            return self.compiler.compile_json_schema(json.dumps(spec), any_whitespace=False)
        return self.compiler.compile_regex(spec)

    def matcher(self, grammar):
        return self.xgr.GrammarMatcher(grammar)

    def fill(self, m) -> torch.Tensor:
        m.fill_next_token_bitmask(self.mask, 0)
        return self.mask[0]

    def advance(self, m, token: int) -> bool:
        """False: the grammar is done (the token was a stop token)."""
        assert m.accept_token(token)
        return not m.is_terminated()

    def accepts(self, m, ids: list[int]) -> bool:
        """Whether the whole text is a complete output."""
        return all(m.accept_token(t) for t in ids) and m.is_completed()


class LLGuidance:
    name = "llguidance"

    def __init__(self, hf, vocab: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg, self.lt = llguidance, llguidance.torch
        self.tok = llguidance.hf.from_tokenizer(hf, n_vocab=vocab)
        self.mask = self.lt.allocate_token_bitmask(1, vocab)

    def compile(self, kind: str, spec):
        M = self.llg.LLMatcher
        grammar = M.grammar_from_json_schema(json.dumps(spec), defaults={"whitespace_flexible": False}) \
            if kind == "json" else M.grammar_from_regex(spec)
        matcher = M(self.tok, grammar)  # compiles (lexer, first mask state) for this tokenizer
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return grammar

    def matcher(self, grammar):
        return self.llg.LLMatcher(self.tok, grammar)

    def fill(self, m) -> torch.Tensor:
        self.lt.fill_next_token_bitmask(m, self.mask, 0)
        return self.mask[0]

    def advance(self, m, token: int) -> bool:
        assert m.consume_token(token), m.get_error()
        return not m.is_stopped()

    def accepts(self, m, ids: list[int]) -> bool:
        return m.try_consume_tokens(ids) == len(ids) and m.is_accepting()


def walk(lib, grammar, hf, eos: int, vocab: int, rng: random.Random) -> tuple[str | None, list[float]]:
    """(text, per-token fill seconds); text None if the walk did not end within MAX_WALK."""
    m, times, tokens = lib.matcher(grammar), [], []
    for _ in range(MAX_WALK):
        t0 = time.perf_counter()
        mask = lib.fill(m)
        times.append(time.perf_counter() - t0)
        ids = allowed_ids(mask, vocab).tolist()
        # Prefer ending when allowed, half the time: random walks through strings run long.
        token = eos if eos in ids and rng.random() < 0.5 else rng.choice(ids)
        tokens.append(token)
        if token == eos or not lib.advance(m, token):
            return hf.decode([t for t in tokens if t != eos]), times
    return None, times


def run(lib, specs: list[tuple[str, object]], hf, vocab: int, seed: int) -> dict:
    compile_s, fill_s, invalid, unfinished, failed = [], [], 0, 0, []
    rng = random.Random(seed)
    for kind, spec in specs:
        t0 = time.perf_counter()
        try:
            grammar = lib.compile(kind, spec)
        except Exception as e:  # counted: a schema the library cannot take
            failed.append(f"{kind}: {str(e)[:120]}")
            continue
        compile_s.append(time.perf_counter() - t0)
        text, times = walk(lib, grammar, hf, hf.eos_token_id, vocab, rng)
        fill_s += times
        if text is None:
            unfinished += 1
        elif not valid(kind, spec, text):
            invalid += 1
            print(f"  {lib.name} invalid: {kind} {json.dumps(spec)[:200]} -> {text[:200]!r}")
    q = statistics.quantiles
    return {"compile_ms_median": 1e3 * statistics.median(compile_s), "compile_ms_p90": 1e3 * q(compile_s, n=10)[-1],
            "compile_ms_max": 1e3 * max(compile_s), "fill_us_median": 1e6 * statistics.median(fill_s),
            "fill_us_p99": 1e6 * q(fill_s, n=100)[-1], "fill_us_mean": 1e6 * statistics.fmean(fill_s),
            "tokens_walked": len(fill_s), "invalid": invalid, "unfinished": unfinished,
            "compile_failures": failed, "grammars": len(specs)}


# (schema, JSON text, whether a correct library accepts it): JSON-string rules that random walks
# over a 49k-token vocabulary rarely reach (a raw tab token inside a bounded string).
PROBES = [
    ({"type": "string", "maxLength": 3}, '"a\tb"', False),  # raw control character: not JSON
    ({"type": "string", "maxLength": 3}, '"\\n"', True),  # an escape, 1 character
    ({"type": "string", "minLength": 1}, '"\u0001"', False),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 2}, "[1]", False),
    ({"type": "integer", "minimum": 3, "maximum": 12}, "13", False),
    ({"enum": ["a", 1, True]}, "true", True),
    # Byte tokens: an overlong encoding and a UTF-16 surrogate are not UTF-8, so not JSON text.
    ({"type": "string", "maxLength": 3}, b'"\xe0\x91\xa7"', False),
    ({"type": "string"}, b'"\xed\xb5\xb6"', False),
]


def byte_ids(hf, data: bytes) -> list[int]:
    """One byte-level BPE token per byte (GPT-2's byte-to-character table)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return hf.convert_tokens_to_ids([table[b] for b in data])


def probe(lib, hf) -> list[str]:
    """The probes a library gets wrong."""
    wrong = []
    for schema, text, ok in PROBES:
        m = lib.matcher(lib.compile("json", schema))
        ids = byte_ids(hf, text) if isinstance(text, bytes) else hf.encode(text, add_special_tokens=False)
        accepted = lib.accepts(m, ids)
        if accepted != ok:
            wrong.append(f"{json.dumps(schema)} {'accepts' if accepted else 'rejects'} {text!r}")
    return wrong


def valid(kind: str, spec, text: str) -> bool:
    if kind == "regex":
        return re.fullmatch(spec, text) is not None
    try:
        jsonschema.validate(json.loads(text), spec)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemas", type=int, default=40)
    ap.add_argument("--regexes", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    hf = AutoTokenizer.from_pretrained(resolve_model(None))
    vocab = len(hf)
    rng = random.Random(args.seed)
    specs = [("json", random_schema(rng)) for _ in range(args.schemas)]
    specs += [("regex", random_regex(rng)) for _ in range(args.regexes)]
    results = {}
    for cls in (XGrammar, LLGuidance):
        t0 = time.perf_counter()
        lib = cls(hf, vocab)
        setup_ms = 1e3 * (time.perf_counter() - t0)
        results[cls.name] = {"tokenizer_setup_ms": setup_ms, **run(lib, specs, hf, vocab, args.seed),
                             "probes_wrong": probe(lib, hf)}
        print(cls.name, json.dumps({k: round(v, 1) if isinstance(v, float) else v
                                    for k, v in results[cls.name].items()}))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
