"""SamplingParams (user-facing, validated) and the batched sampler.

The sampler works on one step's logits for every sequence that produces a token in that
step. Randomness is drawn per row: a row with a `seed` draws from its own torch.Generator, so
its tokens do not depend on what else is in the batch.

`Sampler.launch` only queues work on the logits' device (greedy, top-k/top-p/min-p and seeded
rows alike; penalties are the exception, they read the history back); `SampledTokens.result`
is where the host waits for the tokens. Between the two the engine has the host to itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmq.step_input import SamplingMode, StepSampling, greedy_row
from lmq.structured import GuidedDecodingParams, as_guided
from lmq.transfer import HostCopy, to_device

_GREEDY_EPS = 1e-5
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding controls, shaped like vLLM's and OpenAI's."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF-style, over prompt + output tokens
    presence_penalty: float = 0.0  # OpenAI-style, over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    max_tokens: int | None = 16  # None: up to the context length
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k alternatives returned with every sampled token
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    min_tokens: int = 0  # EOS and stop_token_ids are blocked (stop strings not checked) until this many
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    bad_words: tuple[str, ...] = ()  # texts whose token sequences are never generated
    allowed_token_ids: tuple[int, ...] | None = None  # only these tokens may be generated
    # vLLM's other names: best_of only as n (lmq never ranks extra samples); spaces_between_
    # special_tokens only True (the Rust tokenizer's decoding, as vLLM's fast path) unless special
    # tokens are skipped anyway.
    best_of: int | None = None
    spaces_between_special_tokens: bool = True
    detokenize: bool = True  # False: outputs carry token ids, their text stays ""
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens (-1: max_model_len)
    # bad_words as token sequences (both tokenizations, with and without a leading space), filled
    # by the engine from its tokenizer (`with_bad_words_token_ids`).
    bad_words_token_ids: tuple[tuple[int, ...], ...] = field(default=(), repr=False)
    # Structured output: the tokens follow this grammar (lmq/structured.py). A dict of its
    # fields is taken too; `structured_outputs` is vLLM's newer name for the same thing.
    guided_decoding: GuidedDecodingParams | None = None
    structured_outputs: GuidedDecodingParams | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.structured_outputs is not None:
            if self.guided_decoding is not None:
                raise ValueError("structured_outputs and guided_decoding are two names for one thing: set one")
            object.__setattr__(self, "guided_decoding", self.structured_outputs)
            object.__setattr__(self, "structured_outputs", None)
        object.__setattr__(self, "guided_decoding", as_guided(self.guided_decoding))
        # Accept a single string / list for stop like vLLM, store tuples (the object is frozen).
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        if not isinstance(self.stop_token_ids, tuple):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if isinstance(self.bad_words, str):
            object.__setattr__(self, "bad_words", (self.bad_words,))
        elif not isinstance(self.bad_words, tuple):
            object.__setattr__(self, "bad_words", tuple(self.bad_words or ()))
        if self.allowed_token_ids is not None and not isinstance(self.allowed_token_ids, tuple):
            object.__setattr__(self, "allowed_token_ids", tuple(self.allowed_token_ids))
        if self.logit_bias is not None:
            object.__setattr__(self, "logit_bias", _int_keys(self.logit_bias))
        self._validate()

    def _validate(self) -> None:
        def is_int(x: object, lo: int, hi: float = float("inf")) -> bool:
            return isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi

        def is_num(x: object, lo: float, hi: float, lo_open: bool = False) -> bool:
            return isinstance(x, (int, float)) and (lo < x if lo_open else lo <= x) and x <= hi

        lp = f"None or an integer in [0, {MAX_LOGPROBS}]"
        checks = [
            ("n", self.n, is_int(self.n, 1), "an integer >= 1"),
            ("temperature", self.temperature, is_num(self.temperature, 0.0, 100.0), "in [0, 100]"),
            ("top_p", self.top_p, is_num(self.top_p, 0.0, 1.0, lo_open=True), "in (0, 1]"),
            ("top_k", self.top_k, is_int(self.top_k, -1), "an integer: -1, 0 (disabled) or >= 1"),
            ("min_p", self.min_p, is_num(self.min_p, 0.0, 1.0), "in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty, is_num(self.repetition_penalty, 0.0, 10.0, lo_open=True),
             "in (0, 10]"),
            ("presence_penalty", self.presence_penalty, is_num(self.presence_penalty, -2.0, 2.0), "in [-2, 2]"),
            ("frequency_penalty", self.frequency_penalty, is_num(self.frequency_penalty, -2.0, 2.0), "in [-2, 2]"),
            ("max_tokens", self.max_tokens, self.max_tokens is None or is_int(self.max_tokens, 1),
             "None or an integer >= 1"),
            ("logprobs", self.logprobs, self.logprobs is None or is_int(self.logprobs, 0, MAX_LOGPROBS), lp),
            ("prompt_logprobs", self.prompt_logprobs,
             self.prompt_logprobs is None or is_int(self.prompt_logprobs, 0, MAX_LOGPROBS), lp),
            ("seed", self.seed, self.seed is None or is_int(self.seed, -(2**63), 2**63 - 1),
             "None or an integer in [-2^63, 2^63)"),
            ("stop", self.stop, all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
            ("stop_token_ids", self.stop_token_ids, all(is_int(t, 0) for t in self.stop_token_ids),
             "non-negative integers"),
        ]
        checks += self._token_control_checks(is_int, is_num)
        checks += self._vllm_checks(is_int)
        for name, value, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={value!r} is invalid: must be {allowed}")

    def _token_control_checks(self, is_int, is_num) -> list[tuple[str, object, bool, str]]:
        most = "" if self.max_tokens is None else f" and <= max_tokens={self.max_tokens}"
        checks = [
            ("min_tokens", self.min_tokens, is_int(self.min_tokens, 0, self.max_tokens or float("inf")),
             f"an integer >= 0{most}"),
            ("bad_words", self.bad_words, all(isinstance(w, str) and w.strip() for w in self.bad_words),
             "non-blank strings"),
        ]
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            checks.append(("allowed_token_ids", ids, bool(ids) and all(is_int(t, 0) for t in ids),
                           "None or a non-empty list of non-negative integers"))
        for token, bias in (self.logit_bias or {}).items():
            checks.append((f"logit_bias[{token!r}]", bias, is_num(bias, -100.0, 100.0), "a number in [-100, 100]"))
            checks.append(("logit_bias", token, is_int(token, 0), "keyed by non-negative integer token ids"))
        return checks

    def _vllm_checks(self, is_int) -> list[tuple[str, object, bool, str]]:
        k = self.truncate_prompt_tokens
        return [
            ("best_of", self.best_of, self.best_of is None or self.best_of == self.n,
             f"None or equal to n={self.n} (lmq does not rank extra samples; ask for n samples)"),
            ("truncate_prompt_tokens", k, k is None or k == -1 or is_int(k, 1), "None, -1 or an integer >= 1"),
            ("stop", self.stop, self.detokenize or not self.stop, "empty when detokenize=False (stop strings "
             "are matched on the text)"),
            ("spaces_between_special_tokens", self.spaces_between_special_tokens,
             self.spaces_between_special_tokens is True or (self.spaces_between_special_tokens is False
                                                            and self.skip_special_tokens),
             "True, or False only with skip_special_tokens=True (lmq decodes special tokens as the Rust "
             "tokenizer does)"),
            ("detokenize", self.detokenize, isinstance(self.detokenize, bool), "a bool"),
        ]

    def token_ids_out_of(self, vocab: int) -> tuple[str, int] | None:
        """(field, token id) of the first token id these params name that is not in [0, vocab)."""
        named = [("stop_token_ids", self.stop_token_ids), ("allowed_token_ids", self.allowed_token_ids or ()),
                 ("logit_bias", tuple(self.logit_bias or ()))]
        for name, ids in named:
            bad = [t for t in ids if t >= vocab]
            if bad:
                return name, bad[0]
        return None

    @property
    def needs_token_controls(self) -> bool:
        """Whether the sampler edits this request's logits beyond temperature / top-k / top-p."""
        return bool(self.min_tokens or self.logit_bias or self.bad_words_token_ids
                    or self.allowed_token_ids is not None)

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _int_keys(bias: dict) -> dict[int, float]:
    """OpenAI's JSON sends token ids as strings ("1234"): keys become ints; a key that is no
    integer is kept as it is, for the check to name it."""
    out = {}
    for k, v in dict(bias).items():
        key = int(k) if isinstance(k, str) and k.strip().lstrip("-").isdigit() else k
        out[key] = v
    return out


def with_bad_words_token_ids(params: SamplingParams, encode) -> SamplingParams:
    """params with `bad_words_token_ids` from `encode(text) -> ids` (no special tokens), vLLM's
    way: each word as written (leading spaces stripped) and with one leading space, the second
    kept when it is a different sequence of the same length (not a mere "space + word" split)."""
    if not params.bad_words or params.bad_words_token_ids:
        return params
    seqs: list[tuple[int, ...]] = []
    for word in params.bad_words:
        plain = tuple(encode(word.lstrip()))
        if plain:
            seqs.append(plain)
        spaced = tuple(encode(" " + word.lstrip()))
        if spaced and (not plain or (spaced[0] != plain[0] and len(spaced) == len(plain))):
            seqs.append(spaced)
    return dataclasses.replace(params, bad_words_token_ids=tuple(seqs))


def truncate_prompt(ids: list[int], params: SamplingParams, max_model_len: int, has_images: bool) -> list[int]:
    """The prompt's last `truncate_prompt_tokens` tokens (-1: the last max_model_len), as vLLM
    keeps them. Refused for prompts with images, whose placeholder tokens a cut would split."""
    k = params.truncate_prompt_tokens
    if k is None:
        return ids
    k = max_model_len if k == -1 else k
    if len(ids) <= k:
        return ids
    if has_images:
        raise ValueError(f"truncate_prompt_tokens={params.truncate_prompt_tokens} would cut a prompt with images "
                         f"({len(ids)} tokens): shorten the text instead")
    return ids[-k:]


def banned_token_ids(params: SamplingParams, output_token_ids: list[int], stop_ids: frozenset[int]) -> list[int]:
    """Tokens this row must not produce next: EOS / stop tokens before min_tokens, and the last
    token of every bad word whose other tokens end the output so far (vLLM's rule)."""
    banned = []
    if len(output_token_ids) < params.min_tokens:
        banned.extend(stop_ids)
        banned.extend(params.stop_token_ids)
    for seq in params.bad_words_token_ids:
        prefix = len(seq) - 1
        if prefix <= len(output_token_ids) and \
                (prefix == 0 or tuple(output_token_ids[-prefix:]) == seq[:prefix]):
            banned.append(seq[-1])
    return banned


@dataclass(frozen=True)
class Logprob:
    """vLLM's Logprob: one token's log-probability, its rank, and its text."""

    logprob: float
    rank: int  # 1 = the most likely token
    decoded_token: str | None = None  # the token's own text


TokenTexts = Callable[[list[int]], list[str]]
# A backend's draw in one op: scaled, filtered float32 logits [R, V] and int64 keys [R] -> [R]
# tokens, the race of counter_exponentials' draws (turbomind/kernels/sample.cu)
Race = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def step_seed(seed: int, offset: int) -> int:
    """The seed of one draw: a request's seed (+ its sample index) and the step offset (tokens
    it has sampled so far), mixed into 64 bits. Draws depend on nothing else, so a seeded
    sequence's tokens do not depend on the batch, its order, chunking or preemption, and no
    generator lives with the sequence (`counter_exponentials` draws from it, batched)."""
    return ((seed * 0x9E3779B97F4A7C15) ^ (offset * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB)) % 2**64


@dataclass
class SamplerRow:
    """What the sampler needs of one sequence for one step."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None  # an explicit generator for this row's draw (tests)
    banned: list[int] = field(default_factory=list)  # token ids masked this step (see banned_token_ids)
    seed: int | None = None  # step_seed(...) of a seeded request: its draw's key (counter_exponentials)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row: {token_id: Logprob} for the sampled token and the top-k alternatives, or None.
    logprobs: list[dict[int, Logprob] | None] = field(default_factory=list)


def apply_penalties(logits: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
    """logits: [B, V] float32, modified in place for rows that ask for penalties."""
    for i, row in enumerate(rows):
        p = row.params
        if not p.needs_penalties:
            continue
        vocab = logits.shape[1]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(row.prompt_token_ids + row.output_token_ids, device=logits.device)
            seen = seen[seen < vocab].unique()
            vals = logits[i, seen]
            logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if row.output_token_ids and (p.presence_penalty or p.frequency_penalty):
            out = torch.tensor(row.output_token_ids, device=logits.device)
            counts = torch.zeros(vocab, device=logits.device).index_add_(
                0, out, torch.ones(len(out), device=logits.device))
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return logits


def apply_token_controls(logits: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
    """logits: [B, V] float32, modified in place: logit_bias added, then everything outside
    allowed_token_ids and every banned token set to -inf. One scatter per kind over the
    flattened (row, token) pairs of the whole batch; no loop over the vocabulary."""
    dev = logits.device
    bias_rows, bias_ids, bias_vals = [], [], []
    allow_rows, allow_ids, allow_which = [], [], []
    ban_rows, ban_ids = [], []
    for i, r in enumerate(rows):
        p = r.params
        for t, v in (p.logit_bias or {}).items():
            bias_rows.append(i), bias_ids.append(t), bias_vals.append(float(v))
        if p.allowed_token_ids is not None:
            allow_which.append(i)
            allow_rows.extend([len(allow_which) - 1] * len(p.allowed_token_ids))
            allow_ids.extend(p.allowed_token_ids)
        ban_rows.extend([i] * len(r.banned))
        ban_ids.extend(r.banned)
    if bias_rows:
        logits.index_put_((to_device(bias_rows, dev), to_device(bias_ids, dev)),
                          to_device(bias_vals, dev, torch.float32), accumulate=True)
    if allow_which:
        which = to_device(allow_which, dev)
        keep = torch.zeros(len(allow_which), logits.shape[1], dtype=torch.bool, device=dev)  # [Ba, V]
        keep[to_device(allow_rows, dev), to_device(allow_ids, dev)] = True
        logits[which] = logits[which].masked_fill(~keep, float("-inf"))
    if ban_rows:
        logits[to_device(ban_rows, dev), to_device(ban_ids, dev)] = float("-inf")
    return logits


def _mask_top_k_top_p_min_p(logits: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
    """logits: [B, V] already divided by temperature. Returns logits with -inf outside the kept set."""
    vocab = logits.shape[1]
    top_k = [min(r.params.top_k, vocab) if r.params.top_k > 0 else vocab for r in rows]
    top_p = [r.params.top_p for r in rows]
    min_p = [r.params.min_p for r in rows]
    dev = logits.device
    use_min_p = any(p > 0 for p in min_p)
    use_top = any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p)
    return mask_logits(logits, to_device(top_k, dev) if use_top else None,
                       to_device(top_p, dev, torch.float32) if use_top else None,
                       to_device(min_p, dev, torch.float32) if use_min_p else None)


def mask_logits(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
                min_p: torch.Tensor | None) -> torch.Tensor:
    """logits [B, V] (temperature-scaled) with -inf outside each row's kept set: min_p [B] (None:
    skipped), then top_k [B] (the vocabulary size keeps all) and top_p [B] (both None: skipped).
    Row-wise throughout, so a row with min_p 0, top_k V and top_p 1 keeps what it had except,
    where the sort runs, tokens whose mass before them rounds to >= 1."""
    vocab = logits.shape[1]
    if min_p is not None:
        probs = logits.softmax(-1)
        thresh = min_p[:, None] * probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(probs < thresh, float("-inf"))
    if top_k is not None:
        sorted_logits, order = logits.sort(-1, descending=True)  # [B, V]
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        sorted_logits = sorted_logits.masked_fill(ranks >= top_k[:, None], float("-inf"))
        # top_p on the mass left after top_k: keep the smallest prefix whose mass reaches top_p
        # (the token crossing it stays).
        probs = sorted_logits.softmax(-1)
        drop = (probs.cumsum(-1) - probs) >= top_p[:, None]
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    return logits


_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's state increment
# Elements per pass of counter_exponentials: on a CPU, passes that stay in cache (2 MB of int64
# temporaries: 3.4x faster than a generator per row for 128 x 49,152 draws, 9x faster than one
# pass over all); on a GPU, few launches (32 MB temporaries).
_COUNTER_CHUNK = {"cpu": 1 << 18, "cuda": 1 << 22}


def _i64(u: int) -> int:
    """An unsigned 64-bit value as the int64 with the same bits."""
    return u - (1 << 64) if u >= 1 << 63 else u


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> on int64 is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's output function over int64 tensors (products wrap modulo 2^64, as in C)."""
    x = (x ^ _shr(x, 30)) * _i64(0xBF58476D1CE4E5B9)
    x = (x ^ _shr(x, 27)) * _i64(0x94D049BB133111EB)
    return x ^ _shr(x, 31)


def counter_exponentials(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """keys: [R] int64 (a seeded draw's `step_seed`) -> q [R, V] float32 ~ Exp(1): q[r, v] =
    -log(u), u from the v-th output of splitmix64 started at keys[r] (its top 23 bits, centred
    in their cell, so u is in (0, 1)). A function of (key, v) alone: the same on any device, in
    any batch, and for a kernel that draws them one by one; no generator is made or kept."""
    out = torch.empty(keys.shape[0], vocab, dtype=torch.float32, device=keys.device)
    steps = torch.arange(1, vocab + 1, dtype=torch.int64, device=keys.device) * _i64(_GOLDEN)  # [V]
    rows = max(1, _COUNTER_CHUNK.get(keys.device.type, 1 << 22) // max(vocab, 1))
    for lo in range(0, keys.shape[0], rows):
        x = _mix64(keys[lo:lo + rows, None] + steps[None, :])  # [r, V]
        u = (_shr(x, 41).float() + 0.5) * 2.0 ** -23  # 23 bits: k + 0.5 is exact in float32
        out[lo:lo + rows] = -torch.log(u)
    return out


def race_keys(rows: list[SamplerRow], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """[R] int64 keys of the rows' races: a seeded row's `SamplerRow.seed`, the others drawn
    from `generator` (one draw of as many keys as there are unseeded rows)."""
    keys = to_device([_i64(r.seed) if r.seed is not None else 0 for r in rows], device)
    unseeded = [i for i, r in enumerate(rows) if r.seed is None]
    if unseeded:
        keys[to_device(unseeded, device)] = torch.randint(-2**63, 2**63 - 1, (len(unseeded),), generator=generator,
                                                          dtype=torch.int64, device=device)
    return keys


def counter_race(logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The race over counter_exponentials' draws in torch ops: logits [R, V] (scaled, filtered)
    and keys [R] int64 -> tokens [R] int64, argmax(p / q). (sample.cu's one kernel does the same.)"""
    return (logits.softmax(-1) / counter_exponentials(keys, logits.shape[1])).argmax(-1)


def _random_sample(logits: torch.Tensor, rows: list[SamplerRow], generator: torch.Generator | None,
                   race: Race | None = None) -> torch.Tensor:
    """Exponential-race sampling: argmax(p / q), q ~ Exp(1), equals a draw from p. Seeded rows
    draw q from their `SamplerRow.seed` by a counter-based generator (`counter_exponentials`:
    one batched op for all of them), or from an explicit `SamplerRow.generator`, so their
    tokens do not depend on the rest of the batch; the others from `generator` (the engine's,
    seeded by its `seed`; None: torch's default). With a backend's `race` (same draws, one
    kernel) every row is keyed: unseeded rows get keys drawn from `generator` (`race_keys`)."""
    dev = logits.device
    if race is not None and all(r.generator is None for r in rows):
        return race(logits, race_keys(rows, generator, dev))
    probs = logits.softmax(-1)
    q = torch.empty_like(probs)
    unseeded = [i for i, r in enumerate(rows) if r.generator is None and r.seed is None]
    if unseeded:
        index = to_device(unseeded, dev)
        q[index] = torch.empty_like(probs[index]).exponential_(generator=generator)
    seeded = [i for i, r in enumerate(rows) if r.generator is None and r.seed is not None]
    if seeded:
        keys = to_device([_i64(rows[i].seed) for i in seeded], dev)
        q[to_device(seeded, dev)] = counter_exponentials(keys, probs.shape[1])
    for i, r in enumerate(rows):
        if r.generator is not None:
            q[i].exponential_(generator=r.generator)
    return (probs / q).argmax(-1)


def token_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: list[int],
                   decode: TokenTexts | None = None) -> list[dict[int, Logprob]]:
    """logprobs: [N, V] log-softmax; token_ids: [N]; k[i] alternatives for row i. decode: token
    ids -> their texts, for `Logprob.decoded_token` (None: left None)."""
    parts = logprob_tensors(logprobs, token_ids, max(k, default=0))
    return logprob_dicts([t.tolist() for t in parts], k, decode)


def logprob_tensors(logprobs: torch.Tensor, token_ids: torch.Tensor, max_k: int) -> list[torch.Tensor]:
    """The device half of `token_logprobs`: [ids [N], chosen [N], ranks [N]] and, if max_k > 0,
    [top values, top ids, top ranks] ([N, max_k] each)."""
    chosen = logprobs.gather(1, token_ids[:, None])  # [N, 1]
    out = [token_ids, chosen[:, 0], (logprobs > chosen).sum(-1) + 1]
    if max_k > 0:
        top_v, top_i = logprobs.topk(max_k, -1)  # [N, k]
        # Rank = 1 + how many are strictly more likely (ties share a rank); whatever beats a
        # top-k value is itself in the top k.
        out += [top_v, top_i, (top_v[:, None, :] > top_v[:, :, None]).sum(-1) + 1]
    return out


def logprob_dicts(parts: list[list], k: list[int], decode: TokenTexts | None = None) -> list[dict[int, Logprob]]:
    """The host half of `token_logprobs`, from `logprob_tensors`' tensors as lists."""
    ids, chosen_l, ranks, *top = parts
    top_v_l, top_i_l, top_r_l = top if top else (None, None, None)
    out: list[dict[int, Logprob]] = []
    for i in range(len(ids)):
        row = [(top_i_l[i][j], top_v_l[i][j], top_r_l[i][j]) for j in range(k[i])]
        row.append((ids[i], chosen_l[i], ranks[i]))
        texts = decode([t for t, _, _ in row]) if decode is not None else [None] * len(row)
        out.append({t: Logprob(v, r, text) for (t, v, r), text in zip(row, texts)})
    return out


@dataclass
class SampledTokens:
    """A step's sampling, queued on the device: `result()` waits for it (not for a step queued
    after it) and reads it back."""

    tokens: torch.Tensor  # [B] int64 on the logits' device (the next step may read them there)
    copy: HostCopy  # the tokens, then `logprob_tensors` of the rows that want logprobs
    want: list[int]  # the rows that want logprobs
    ks: list[int]  # their top-k alternatives
    decode: TokenTexts | None = None  # fills Logprob.decoded_token

    def result(self) -> SamplerOutput:
        token_ids, *parts = self.copy.lists()
        logprobs: list[dict[int, Logprob] | None] = [None] * len(token_ids)
        if self.want:
            for i, entry in zip(self.want, logprob_dicts(parts, self.ks, self.decode)):
                logprobs[i] = entry
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)


class Sampler:
    """Turns a step's logits [B, V] into one token per row. `generator`: draws of rows without
    a seed of their own (on the logits' device). `decode`: token ids -> texts, for the
    logprobs' `decoded_token`. `race`: the backend's one-op draw (`_random_sample`), if any."""

    def __init__(self, generator: torch.Generator | None = None, decode: TokenTexts | None = None,
                 race: Race | None = None) -> None:
        self.generator = generator
        self.decode = decode
        self.race = race

    def __call__(self, logits: torch.Tensor, rows: list[SamplerRow]) -> SamplerOutput:
        return self.launch(logits, rows).result()

    def launch(self, logits: torch.Tensor, rows: list[SamplerRow]) -> SampledTokens:
        logits = logits.float()
        raw = logits
        if any(r.params.needs_penalties for r in rows):
            logits = apply_penalties(logits.clone(), rows)
        if any(r.banned or r.params.needs_token_controls for r in rows):
            logits = apply_token_controls(logits.clone() if logits is raw else logits, rows)
        tokens = logits.argmax(-1)  # greedy rows keep this
        rand = [i for i, r in enumerate(rows) if not r.params.greedy]
        if rand:
            sub_rows = [rows[i] for i in rand]
            index = to_device(rand, logits.device)
            temps = to_device([r.params.temperature for r in sub_rows], logits.device, torch.float32)[:, None]
            sub = _mask_top_k_top_p_min_p(logits[index] / temps, sub_rows)
            tokens[index] = _random_sample(sub, sub_rows, self.generator, self.race)
        return self.finish(tokens, raw, rows)

    def finish(self, tokens: torch.Tensor, logits: torch.Tensor, rows: list[SamplerRow]) -> SampledTokens:
        """The step's tokens [B] (drawn by `launch`, or by the runner from `step_sampling`), their
        logprobs queued from the logits [B, V], and the copy back to the host."""
        want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if not want:
            return SampledTokens(tokens, HostCopy([tokens]), want, [])
        index = to_device(want, logits.device)
        ks = [rows[i].params.logprobs for i in want]
        # Logprobs are of the model's distribution (before penalties), like vLLM's default.
        parts = logprob_tensors(logits[index].float().log_softmax(-1), tokens[index], max(ks))
        return SampledTokens(tokens, HostCopy([tokens, *parts]), want, ks, self.decode)

    def step_sampling(self, rows: list[SamplerRow], vocab: int, device: torch.device) -> StepSampling | None:
        """The rows' draws as device tensors for a runner to sample inside its step
        (lmq.static_sampling), or None where a row needs more than the logits: penalties, token
        controls or bans, an explicit generator. Keys as `launch` draws them (`race_keys`), so
        with the same backend race the tokens are the same."""
        if any(r.params.needs_penalties or r.params.needs_token_controls or r.banned or r.generator is not None
               for r in rows):
            return None
        params, rand = [], []
        for i, r in enumerate(rows):
            p = r.params
            if p.greedy:
                params.append(greedy_row(vocab))
            else:
                rand.append(i)
                params.append((p.temperature, p.top_p, p.min_p, float(min(p.top_k, vocab) if p.top_k > 0 else vocab)))
        drawing = [rows[i].params for i in rand]
        mode = SamplingMode(random=bool(rand), min_p=any(p.min_p > 0 for p in drawing),
                            top=any(0 < p.top_k < vocab or p.top_p < 1.0 for p in drawing))
        keys = torch.zeros(len(rows), dtype=torch.int64, device=device)
        if rand:
            keys[to_device(rand, device)] = race_keys([rows[i] for i in rand], self.generator, device)
        return StepSampling(mode, torch.tensor(params, dtype=torch.float32).to(device, non_blocking=True), keys)
