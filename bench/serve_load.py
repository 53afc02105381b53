"""Server load: N concurrent streaming clients over loopback against `lmq serve`, compared with
the offline engine on the same requests, on the same device, in the same run.

    python bench/serve_load.py                                      # CPU, the built-in model
    python bench/serve_load.py --random-1b --clients 64 256         # GPU, Llama-3.2-1B-shaped model

The server runs in its own process (`python -m lmq.cli serve`), and the clients are spread over
--client-procs processes of their own, so the load generator neither shares the server's
interpreter nor becomes the bottleneck itself. Each client sends --requests-per-client
streaming /v1/completions requests one after another (random token-id prompts, exactly
--output-len tokens, greedy). Reported:
requests/s, output tokens/s, TTFT and inter-token latency p50/p99, errors, KV blocks free after
the drain, and server throughput as a share of the offline engine's on the same requests.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import _paths  # noqa: F401  (first: see its docstring)
import httpx
import torch
from throughput import make_prompts, make_random_1b
from tqdm.auto import tqdm

from lmq import LLM, SamplingParams
from lmq.weights import resolve_model

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Load:
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0
    done: int = 0


def _pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else (xs[0] if xs else float("nan"))


async def _one(client: httpx.AsyncClient, url: str, prompt: list[int], output_len: int, load: Load) -> None:
    body = {"model": "bench", "prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                load.errors += 1
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("usage"):
                    load.tokens += chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and chunk["choices"][0]["text"]:
                    if last is None:
                        load.ttft.append(now - t0)
                    else:
                        load.itl.append(now - last)
                    last = now
        load.done += 1
    except httpx.HTTPError:
        load.errors += 1


async def _run_clients(url: str, per_client: list[list[list[int]]], output_len: int, start_at: float) -> Load:
    load = Load()
    n = len(per_client)
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def worker(ps: list[list[int]]) -> None:
            for p in ps:
                await _one(client, url, p, output_len, load)

        await asyncio.sleep(max(start_at - time.time(), 0))
        await asyncio.gather(*(worker(ps) for ps in per_client))
    return load


def _client_process(url: str, per_client: list[list[list[int]]], output_len: int,
                    start_at: float) -> tuple[Load, float]:
    load = asyncio.run(_run_clients(url, per_client, output_len, start_at))
    return load, time.time()


def run_load(url: str, prompts: list[list[int]], clients: int, output_len: int,
             pool: ProcessPoolExecutor, procs: int) -> tuple[Load, float]:
    """The clients, spread over the pool's `procs` processes (one Python process parsing every
    SSE chunk of 256 streams would itself be the bottleneck), all starting at the same moment."""
    per_client = [prompts[i::clients] for i in range(clients)]
    start_at = time.time() + 3.0  # every process is up and waiting by then
    futures = [pool.submit(_client_process, url, per_client[k::procs], output_len, start_at)
               for k in range(min(procs, clients))]
    total, end = Load(), start_at
    for f in futures:
        load, finished = f.result()
        total.ttft += load.ttft
        total.itl += load.itl
        total.tokens += load.tokens
        total.errors += load.errors
        total.done += load.done
        end = max(end, finished)
    return total, end - start_at


def offline_tok_s(folder: str, prompts: list[list[int]], warmup: list[list[int]], output_len: int,
                  opts: dict) -> float:
    llm = LLM(folder, **opts)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate(warmup, params)  # graphs, kernels; other prompts, so no prefix-cache hits later
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return tokens / elapsed


def start_server(folder: str, opts: dict, log: Path, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """`lmq serve` in a process of its own with `--key value` per item of `opts`, then `extra`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lmq.cli", "serve", folder, "--port", str(port), "--served-model-name", "bench"]
    for k, v in opts.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    cmd += list(extra)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: see {log}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not start")


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of one process so far, from /proc (Linux); the server's HTTP
    process, not its engine process: near 1.0 per second of load means the HTTP side is busy."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metrics(url: str) -> dict[str, float]:
    """One scrape of the server's /metrics: every unlabelled sample by its full name."""
    samples = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        if value and not line.startswith("#") and "{" not in name:
            samples[name] = float(value)
    return samples


def metric(url: str, name: str) -> float:
    """One sample of the server's /metrics by its full name (e.g. `lmq_kv_cache_free_blocks`)."""
    value = metrics(url).get(name)
    if value is None:
        raise RuntimeError(f"no {name} in /metrics")
    return value


def server_ttft(url: str) -> tuple[float, float]:
    """(sum, count) of the server's own TTFT histogram: from the HTTP handler taking the
    request to the engine sampling its first token (the client's TTFT adds the connection,
    the parsing and the delivery of the first chunk)."""
    return (metric(url, "lmq_time_to_first_token_seconds_sum"), metric(url, "lmq_time_to_first_token_seconds_count"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--random-1b", action="store_true")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--clients", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--requests-per-client", type=int, default=1)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--client-procs", type=int, default=max(min((os.cpu_count() or 2) // 2, 8), 1),
                    help="processes the clients are spread over (default: half the cores, at most 8)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="lmq-serve-load-"))
    if args.random_1b:
        folder = str(make_random_1b(tmp / "model", args.tokenizer or resolve_model(None), args.device))
    else:
        folder = resolve_model(args.model)
    rows = []
    pool = ProcessPoolExecutor(args.client_procs, mp_context=multiprocessing.get_context("spawn"))
    list(pool.map(time.sleep, [2.0] * args.client_procs))  # every client process started and imported
    for n in tqdm(args.clients, desc="client counts"):
        prompts = make_prompts(n * args.requests_per_client, args.input_len, 32000, seed=n)
        warmup = make_prompts(n, args.input_len, 32000, seed=10_000 + n)
        max_len = args.input_len + args.output_len + 16
        # Same KV cache for both sides: room for every concurrent sequence at full length.
        blocks = n * -(-max_len // 16) + 16
        opts = {"device": args.device, "max_num_seqs": n, "max_model_len": max_len, "num_kv_blocks": blocks}
        offline = offline_tok_s(folder, prompts, warmup, args.output_len, opts)
        proc, url = start_server(folder, opts, tmp / f"server-{n}.log")
        try:
            run_load(url, warmup, n, args.output_len, pool, args.client_procs)  # warm-up: graphs, connections
            cpu0, ttft0 = _cpu_seconds(proc.pid), server_ttft(url)
            load, elapsed = run_load(url, prompts, n, args.output_len, pool, args.client_procs)
            server_cpu = (_cpu_seconds(proc.pid) - cpu0) / elapsed
            ttft1 = server_ttft(url)
            time.sleep(0.5)
            free = int(metric(url, "lmq_kv_cache_free_blocks"))
        finally:
            proc.terminate()
            proc.wait(60)
        rows.append({"clients": n, "requests": len(prompts), "req_s": load.done / elapsed,
                     "out_tok_s": load.tokens / elapsed, "offline_tok_s": offline,
                     "server_share_of_offline": load.tokens / elapsed / offline,
                     "ttft_p50_ms": 1e3 * _pct(load.ttft, 50), "ttft_p99_ms": 1e3 * _pct(load.ttft, 99),
                     "ttft_mean_ms": 1e3 * statistics.fmean(load.ttft) if load.ttft else float("nan"),
                     "server_ttft_mean_ms": 1e3 * (ttft1[0] - ttft0[0]) / max(ttft1[1] - ttft0[1], 1),
                     "itl_p50_ms": 1e3 * _pct(load.itl, 50), "itl_p99_ms": 1e3 * _pct(load.itl, 99),
                     "errors": load.errors, "free_blocks_after": free, "num_blocks": blocks,
                     "http_process_cpu_share": server_cpu})
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"\nmodel={'random-1b' if args.random_1b else folder} device={dev} input_len<={args.input_len} "
          f"output_len={args.output_len} requests/client={args.requests_per_client}")
    print(f"{'clients':>7} {'req/s':>7} {'tok/s':>8} {'offline':>8} {'share':>6} {'TTFT p50/p99 ms':>16} "
          f"{'ITL p50/p99 ms':>15} {'errors':>6} {'free/blocks':>11} {'HTTP CPU':>8} "
          f"{'TTFT mean client/server ms':>26}")
    for r in rows:
        print(f"{r['clients']:>7} {r['req_s']:>7.2f} {r['out_tok_s']:>8.1f} {r['offline_tok_s']:>8.1f} "
              f"{r['server_share_of_offline']:>6.1%} {r['ttft_p50_ms']:>7.0f}/{r['ttft_p99_ms']:<8.0f} "
              f"{r['itl_p50_ms']:>6.1f}/{r['itl_p99_ms']:<8.1f} {r['errors']:>6} "
              f"{r['free_blocks_after']:>5}/{r['num_blocks']:<5} {r['http_process_cpu_share']:>7.0%} "
              f"{r['ttft_mean_ms']:>14.0f}/{r['server_ttft_mean_ms']:<11.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": dev, "client_procs": args.client_procs, "rows": rows},
                                              indent=1))
    pool.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
