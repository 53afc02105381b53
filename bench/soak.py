"""Soak: a bounded run of mixed traffic with adapters against `lmq serve`, then the leak checks.

    python bench/soak.py                                  # 10 minutes, the built-in model, CPU
    python bench/soak.py --duration 60 --workers 4        # a quick look

The server runs in its own process (`python -m lmq.cli serve`, engine in a child process) with
two peft adapters from the start and a third that an admin task loads and unloads at run time
through --lora-dir, over --max-loras 2 device slots and --max-cpu-loras 2 host copies (so slots
swap and adapters are re-read from disk). --workers async clients loop over a random mix of:

- streaming chat on the base model or an adapter (must end with a finish_reason and [DONE]);
- non-streaming completions, n=1 or 2 (usage must match the tokens returned);
- aborted streams (closed after two chunks of a long generation: the engine must abort them);
- non-streaming requests whose client gives up after --give-up-s (the same, without a stream);
- requests on the run-time adapter (200 while loaded, 404 while not);
- bad requests, each with its expected status: unknown model 404, max_tokens over the context
  400, a prompt over the context 400, temperature < 0 400, malformed JSON 400, an image for this
  text-only model 400 (a data URL whose bytes are not an image).

Any other status, a 5xx, a broken stream or an unexpected exception counts as an error. Every
--sample-s seconds the resident memory (VmRSS) of the server and its children is sampled. After
the run the clients stop, the server drains, and the checks are: 0 errors, every KV block free,
no adapter slot pinned and no adapter request open, the engine's abort counter moved, and the
memory after warm-up (the first --warmup-s seconds) not growing by more than --max-growth.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import shutil
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import _paths  # noqa: F401  (first: see its docstring)
import httpx
import torch
from serve_load import metrics, start_server
from tqdm.auto import tqdm

from lmq.weights import resolve_model
from lora.adapter import PROJECTIONS

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly box with jolly "
         "giants near old castles and rivers under bright stars").split()


@dataclass
class Tally:
    ok: Counter = field(default_factory=Counter)  # kind -> requests that behaved as expected
    errors: Counter = field(default_factory=Counter)  # kind -> requests that did not
    examples: list[str] = field(default_factory=list)  # the first few errors, for the report

    def bad(self, kind: str, why: str) -> None:
        self.errors[kind] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{kind}: {why}")


def make_adapter(base: str, folder: Path, rank: int, targets: list[str], seed: int) -> str:
    """A trained-looking peft adapter (random, non-zero A and B) for the base model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False, lora_dropout=0.0)
    get_peft_model(model, cfg).save_pretrained(folder)
    return str(folder)


def tree_rss_mib(pid: int) -> float:
    """VmRSS of a process and all its descendants (Linux /proc), MiB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue  # exited meanwhile
    return total / 1024


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


class Soak:
    def __init__(self, url: str, args: argparse.Namespace, adapters: list[str]) -> None:
        self.url, self.args, self.adapters = url, args, adapters
        self.tally = Tally()
        self.stop = asyncio.Event()

    # -- the request kinds: each returns normally when the server behaved as expected -----------
    async def chat_stream(self, c: httpx.AsyncClient, rng: random.Random, model: str | None = None,
                          allowed: tuple[int, ...] = (200,)) -> str:
        model = model or rng.choice(["bench", *self.adapters])
        body = {"model": model, "messages": [{"role": "user", "content": _text(rng, rng.randint(3, 40))}],
                "max_tokens": rng.randint(4, 48), "temperature": rng.choice([0.0, 0.8]), "stream": True,
                "stream_options": {"include_usage": True}}
        async with c.stream("POST", self.url + "/v1/chat/completions", json=body) as r:
            if r.status_code not in allowed:
                raise AssertionError(f"status {r.status_code}: {(await r.aread())[:200]!r}")
            if r.status_code != 200:
                return f"status {r.status_code}"
            finish, done, usage = None, False, None
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise AssertionError(f"error chunk {chunk['error']}")
                    usage = chunk.get("usage") or usage
                    for ch in chunk.get("choices", []):
                        finish = ch.get("finish_reason") or finish
            if not (done and finish in ("stop", "length") and usage
                    and usage["completion_tokens"] <= body["max_tokens"]):
                raise AssertionError(f"broken stream: done={done} finish={finish} usage={usage}")
        return "ok"

    async def completion(self, c: httpx.AsyncClient, rng: random.Random) -> str:
        n = rng.choice([1, 2])
        body = {"model": rng.choice(["bench", *self.adapters]), "prompt": _text(rng, rng.randint(2, 60)),
                "max_tokens": rng.randint(1, 48), "n": n, "temperature": 0.7, "seed": rng.randint(0, 1 << 30)}
        r = await c.post(self.url + "/v1/completions", json=body)
        if r.status_code != 200:
            raise AssertionError(f"status {r.status_code}: {r.text[:200]}")
        out = r.json()
        if len(out["choices"]) != n or any(ch["finish_reason"] not in ("stop", "length") for ch in out["choices"]):
            raise AssertionError(f"choices {out['choices']}")
        return "ok"

    async def aborted_stream(self, c: httpx.AsyncClient, rng: random.Random) -> str:
        body = {"model": rng.choice(["bench", *self.adapters]), "prompt": _text(rng, 8), "max_tokens": 400,
                "ignore_eos": True, "stream": True, "logprobs": 0}  # a chunk per token
        async with c.stream("POST", self.url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise AssertionError(f"status {r.status_code}")
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen == 2:
                    break  # leaving the block closes the connection mid-stream
        return "ok"

    async def given_up(self, c: httpx.AsyncClient, rng: random.Random) -> str:
        body = {"model": rng.choice(["bench", *self.adapters]), "prompt": _text(rng, 8), "max_tokens": 400,
                "ignore_eos": True}
        try:
            r = await c.post(self.url + "/v1/completions", json=body, timeout=self.args.give_up_s)
        except httpx.TimeoutException:
            return "gave up"
        if r.status_code != 200:
            raise AssertionError(f"status {r.status_code}")
        return "finished first"

    async def dynamic(self, c: httpx.AsyncClient, rng: random.Random) -> str:
        return await self.chat_stream(c, rng, model="dyn", allowed=(200, 404))

    async def bad(self, c: httpx.AsyncClient, rng: random.Random) -> str:
        ctx = self.args.max_model_len
        msg = [{"role": "user", "content": "hi"}]
        not_an_image = "data:image/png;base64," + base64.b64encode(b"not a png").decode()
        cases = {
            "unknown model": (404, {"model": "no-such-adapter", "messages": msg}),
            "max_tokens": (400, {"model": "bench", "messages": msg, "max_tokens": ctx + 1}),
            "long prompt": (400, {"model": "bench", "prompt": "hello " * (2 * ctx), "max_tokens": 4}),
            "temperature": (400, {"model": "bench", "messages": msg, "temperature": -1}),
            "malformed json": (400, b'{"model": "bench", "messages": [{"role": "user"'),
            "image": (400, {"model": "bench", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": not_an_image}}]}]}),
        }
        name = rng.choice(list(cases))
        status, body = cases[name]
        path = "/v1/completions" if isinstance(body, dict) and "prompt" in body else "/v1/chat/completions"
        if isinstance(body, bytes):
            r = await c.post(self.url + path, content=body, headers={"content-type": "application/json"})
        else:
            r = await c.post(self.url + path, json=body)
        err = r.json().get("error", {}) if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code != status or not err.get("message"):
            raise AssertionError(f"{name}: status {r.status_code} (expected {status}): {r.text[:200]}")
        return name

    # -- the loops ---------------------------------------------------------------------------------
    async def worker(self, c: httpx.AsyncClient, seed: int) -> None:
        rng = random.Random(seed)
        kinds = {"chat_stream": 4, "completion": 3, "aborted_stream": 1, "given_up": 1, "dynamic": 1, "bad": 2}
        while not self.stop.is_set():
            kind = rng.choices(list(kinds), weights=list(kinds.values()))[0]
            try:
                outcome = await getattr(self, kind)(c, rng)
                self.tally.ok[f"{kind}: {outcome}" if outcome != "ok" else kind] += 1
            except (AssertionError, httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
                self.tally.bad(kind, f"{type(e).__name__}: {e}")

    async def admin(self, c: httpx.AsyncClient, lora_dir_name: str) -> None:
        """Load the run-time adapter, let it serve a while, unload it (requests on it may still run)."""
        while not self.stop.is_set():
            await self._admin_call(c, "load", {"lora_name": "dyn", "lora_path": lora_dir_name})
            await asyncio.sleep(self.args.adapter_cycle_s)
            await self._admin_call(c, "unload", {"lora_name": "dyn"})
            await asyncio.sleep(self.args.adapter_cycle_s / 2)

    async def _admin_call(self, c: httpx.AsyncClient, verb: str, body: dict) -> None:
        r = await c.post(f"{self.url}/v1/{verb}_lora_adapter", json=body)
        if r.status_code == 200:
            self.tally.ok[f"admin {verb}"] += 1
        else:
            self.tally.bad(f"admin {verb}", f"status {r.status_code}: {r.text[:200]}")

    async def run(self, server_pid: int, samples: list[tuple[float, float]]) -> None:
        limits = httpx.Limits(max_connections=self.args.workers + 8)
        async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as c:
            tasks = [asyncio.create_task(self.worker(c, 1000 + i)) for i in range(self.args.workers)]
            tasks.append(asyncio.create_task(self.admin(c, "dyn")))
            t0 = time.monotonic()
            with tqdm(total=self.args.duration, desc="soak", unit="s", bar_format="{l_bar}{bar}| {n:.0f}/{total}s "
                      "{postfix}") as bar:
                while (elapsed := time.monotonic() - t0) < self.args.duration:
                    await asyncio.sleep(min(self.args.sample_s, self.args.duration - elapsed))
                    samples.append((time.monotonic() - t0, tree_rss_mib(server_pid)))
                    bar.n = min(time.monotonic() - t0, self.args.duration)
                    bar.set_postfix(ok=sum(self.tally.ok.values()), errors=sum(self.tally.errors.values()),
                                    rss_mib=f"{samples[-1][1]:.0f}")
            self.stop.set()
            await asyncio.gather(*tasks)


def wait_drained(url: str, timeout: float = 120.0) -> dict[str, float]:
    """Wait until nothing runs or waits; returns that scrape of /metrics."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = metrics(url)
        if m["lmq_num_requests_running"] == 0 and m["lmq_num_requests_waiting"] == 0:
            return m
        time.sleep(0.5)
    raise RuntimeError(f"the server did not drain in {timeout:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder or .gguf (default: the built-in model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of traffic (default: 600)")
    ap.add_argument("--workers", type=int, default=8, help="concurrent clients (default: 8)")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--give-up-s", type=float, default=0.5, help="client timeout of the given-up requests")
    ap.add_argument("--adapter-cycle-s", type=float, default=20.0, help="seconds the run-time adapter stays loaded")
    ap.add_argument("--sample-s", type=float, default=5.0, help="memory sampling period")
    ap.add_argument("--warmup-s", type=float, default=120.0, help="memory growth is measured after this")
    ap.add_argument("--max-growth", type=float, default=0.05, help="allowed RSS growth after warm-up (default: 5%%)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="lmq-soak-"))
    folder = resolve_model(args.model)
    lora_dir = tmp / "lora"
    adapters = {"qv8": make_adapter(folder, tmp / "qv8", 8, ["q_proj", "v_proj"], seed=1),
                "all16": make_adapter(folder, tmp / "all16", 16, list(PROJECTIONS), seed=2)}
    make_adapter(folder, lora_dir / "dyn", 4, ["o_proj", "down_proj"], seed=3)
    opts = {"device": args.device, "max_model_len": args.max_model_len, "max_num_seqs": 2 * args.workers,
            "kv_cache_gb": 0.25, "max_loras": 2, "max_cpu_loras": 2, "lora_dir": lora_dir}
    extra = ("--adapters", *(f"{k}={v}" for k, v in adapters.items()))
    log = tmp / "server.log"
    proc, url = start_server(folder, opts, log, extra)
    samples: list[tuple[float, float]] = []
    try:
        start = metrics(url)
        num_blocks = int(start["lmq_kv_cache_free_blocks"])  # idle: every block is free
        aborted0 = start["lmq_num_aborted_requests"]
        soak = Soak(url, args, list(adapters))
        t0 = time.monotonic()
        asyncio.run(soak.run(proc.pid, samples))
        end = wait_drained(url)
        drain_s = time.monotonic() - t0 - args.duration
        health = httpx.get(url + "/health").status_code
    finally:
        proc.terminate()
        proc.wait(60)
    tracebacks = log.read_text().count("Traceback")

    warm = [rss for t, rss in samples if t >= args.warmup_s]
    rss_warm, rss_end = (warm[0], statistics.fmean(warm[-3:])) if warm else (float("nan"), float("nan"))
    growth = rss_end / rss_warm - 1
    tally = soak.tally
    checks = {
        "no unexpected errors": sum(tally.errors.values()) == 0,
        "no server tracebacks": tracebacks == 0,
        "server healthy after the run": health == 200,
        "every KV block free": int(end["lmq_kv_cache_free_blocks"]) == num_blocks,
        "no adapter slot pinned": end["lmq_lora_slot_pins"] == 0,
        "no adapter request open": end["lmq_lora_requests"] == 0,
        "aborts reached the engine": end["lmq_num_aborted_requests"] > aborted0,
        f"RSS growth after warm-up <= {args.max_growth:.0%}": growth <= args.max_growth,
    }
    result = {
        "duration_s": args.duration, "workers": args.workers, "drain_s": drain_s,
        "requests_ok": dict(tally.ok), "requests_ok_total": sum(tally.ok.values()),
        "errors": dict(tally.errors), "error_examples": tally.examples, "server_tracebacks": tracebacks,
        "num_blocks": num_blocks, "free_blocks_after": int(end["lmq_kv_cache_free_blocks"]),
        "lora_slot_pins_after": end["lmq_lora_slot_pins"], "lora_requests_after": end["lmq_lora_requests"],
        "engine_aborts": end["lmq_num_aborted_requests"] - aborted0, "preemptions": end["lmq_num_preemptions"],
        "rss_mib_first": samples[0][1] if samples else None, "rss_mib_after_warmup": rss_warm,
        "rss_mib_end": rss_end, "rss_growth_after_warmup": growth, "rss_samples": samples,
        "checks": checks, "passed": all(checks.values()),
    }
    print(f"\n{result['requests_ok_total']} requests as expected in {args.duration:.0f} s with {args.workers} "
          f"clients; drained in {drain_s:.1f} s")
    for kind, n in sorted(tally.ok.items()):
        print(f"  {n:>6}  {kind}")
    for line in tally.examples:
        print(f"  ERROR {line}")
    print(f"KV blocks free {result['free_blocks_after']}/{num_blocks}; adapter pins {end['lmq_lora_slot_pins']:.0f}, "
          f"open adapter requests {end['lmq_lora_requests']:.0f}; engine aborts {result['engine_aborts']:.0f}")
    print(f"RSS (server + engine) MiB: first {result['rss_mib_first']:.0f}, after warm-up {rss_warm:.0f}, "
          f"end {rss_end:.0f} ({growth:+.1%})")
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    raise SystemExit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
