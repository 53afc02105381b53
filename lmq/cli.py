"""The `lmq` command: `lmq generate PROMPT`, `lmq chat`, `lmq serve`, `lmq awq` and `lmq ui`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from lmq.backends import BACKENDS
from lmq.sampling import SamplingParams
from quant_tools.cli import add_awq_command


def _engine_args(p: argparse.ArgumentParser) -> None:
    """Engine options; where vLLM has a flag of the same meaning, its name is the flag or an alias."""
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", default=None,
                   help="HF folder or .gguf file (default: the built-in SmolLM2-135M-Instruct)")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder, if not the model's own")
    g.add_argument("--chat-template", default=None, metavar="TEMPLATE",
                   help="chat template replacing the tokenizer's: a Jinja file or the template text itself")
    g.add_argument("--backend", choices=("auto", *BACKENDS), default="auto", help="engine (default: auto)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "half", "float"],
                   help="auto: the checkpoint's dtype on a GPU, float32 on CPU (half = float16, float = float32)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--seed", type=int, default=0, help="seed of the draws of requests without their own (default: 0)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    g.add_argument("--num-kv-blocks", type=int, default=None, help="fix the KV block count instead of sizing it")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="share of GPU memory for weights, activations and KV cache (default: 0.9)")
    g.add_argument("--kv-cache-gb", type=float, default=2.0, help="KV cache size on CPU in GiB (default: 2)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="sequences per step (default: 256)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget per step; longer prompts are prefilled in chunks")
    g.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="automatic prefix caching (default: on)")
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="the same as --no-enable-prefix-caching")
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs: every decode step runs eagerly")
    g.add_argument("--async-scheduling", action="store_true",
                   help="schedule each step while the one before runs on the device (default: off)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run the model folder's own config / tokenizer code")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="vLLM's; lmq runs a model on one GPU, so only 1 is accepted")
    g.add_argument("--quantization", "-q", default=None, choices=["awq"],
                   help="check that the checkpoint is AWQ (default: whatever the checkpoint is)")


def _adapter_pair(text: str) -> tuple[str, str]:
    """NAME=PATH, or vLLM's JSON form {"name": ..., "path": ...}."""
    if text.lstrip().startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"invalid JSON adapter {text!r}: {e}") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or \
                not isinstance(spec.get("path"), str) or not spec["name"] or not spec["path"]:
            raise argparse.ArgumentTypeError(f'expected {{"name": NAME, "path": PATH}}, got {text!r}')
        return spec["name"], spec["path"]
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def _lora_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-LoRA")
    g.add_argument("--adapters", "--lora-modules", nargs="+", type=_adapter_pair, default=[], metavar="NAME=PATH",
                   help='peft LoRA folders to serve, each under its NAME (enables LoRA); also vLLM\'s JSON form '
                        '\'{"name": NAME, "path": PATH}\'')
    g.add_argument("--enable-lora", action="store_true", help="allow adapters loaded at run time")
    g.add_argument("--max-loras", type=int, default=8, help="adapters one step may mix: device slots (default: 8)")
    g.add_argument("--max-lora-rank", type=int, default=64, help="largest adapter rank accepted (default: 64)")
    g.add_argument("--max-cpu-loras", type=int, default=None,
                   help="adapters kept in host memory, LRU (default: max(max-loras, 32))")


def _tool_args(p: argparse.ArgumentParser) -> None:
    from lmq.tool_parsers import PARSERS

    g = p.add_argument_group("tool calling")
    g.add_argument("--tool-call-parser", choices=sorted(PARSERS), default=None,
                   help="the format of the model's tool calls (default: recognised from its chat template)")
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted for vLLM's command lines: tool_choice 'auto' is always served")


def _vision_args(p: argparse.ArgumentParser, server: bool) -> None:
    g = p.add_argument_group("vision-language models")
    g.add_argument("--vision-devices", nargs="+", default=[], metavar="DEVICE",
                   help="devices of the image-encoder replicas (default: every visible GPU, else the engine's device)")
    g.add_argument("--vision-max-batch-size", type=int, default=16, help="images one encoder batch takes (default: 16)")
    if not server:
        return
    g.add_argument("--limit-images-per-prompt", type=int, default=8,
                   help="images one chat request may carry (default: 8)")
    g.add_argument("--allowed-media-dir", default=None,
                   help="image_url may name local files (file:// or a path) inside this directory (default: none)")
    g.add_argument("--allow-private-media", action="store_true",
                   help="let image URLs reach private, loopback and link-local addresses (refused by default)")


def _sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens to generate (default: {max_tokens})")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _engine_options(args: argparse.Namespace) -> dict:
    opts = dict(backend=args.backend, dtype=args.dtype, device=args.device, block_size=args.block_size,
                num_kv_blocks=args.num_kv_blocks, gpu_memory_utilization=args.gpu_memory_utilization,
                kv_cache_gb=args.kv_cache_gb, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                enable_prefix_caching=args.enable_prefix_caching, tokenizer=args.tokenizer,
                chat_template=args.chat_template, seed=args.seed, enforce_eager=args.enforce_eager,
                async_scheduling=args.async_scheduling,
                trust_remote_code=args.trust_remote_code, tensor_parallel_size=args.tensor_parallel_size,
                quantization=args.quantization)
    if hasattr(args, "vision_devices"):
        opts.update(vision_devices=tuple(args.vision_devices), vision_max_batch_size=args.vision_max_batch_size)
    if hasattr(args, "adapters"):
        lora_dir = getattr(args, "lora_dir", None)
        opts.update(enable_lora=bool(args.enable_lora or args.adapters or lora_dir), max_loras=args.max_loras,
                    max_lora_rank=args.max_lora_rank, max_cpu_loras=args.max_cpu_loras)
    return opts


def _llm(args: argparse.Namespace):
    from lmq.llm import LLM

    return LLM(args.model, **_engine_options(args), adapters=dict(getattr(args, "adapters", [])))


def _params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          stop=tuple(args.stop))


def cmd_generate(args: argparse.Namespace) -> int:
    llm = _llm(args)
    params = _params(args)
    for prompt in args.prompt:
        chat = args.chat or args.chat_template is not None
        ids = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
        for delta in llm.stream(ids, params, adapter=args.adapter):
            print(delta, end="", flush=True)
        print()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    llm = _llm(args)
    params = _params(args)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print("lmq chat: type a message; /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        reply = []
        try:
            for delta in llm.stream(llm.tokenizer.apply_chat_template(history), params):
                reply.append(delta)
                print(delta, end="", flush=True)
        except KeyboardInterrupt:
            pass  # stop this answer, keep the session
        print()
        history.append({"role": "assistant", "content": "".join(reply)})


def cmd_serve(args: argparse.Namespace) -> int:
    from lmq.llm import build_engine_config
    from serve.server import make_app, run
    from vision.media import MediaConfig

    if args.model_pos and args.model:
        raise ValueError("give the model once: as MODEL or as --model")
    config = build_engine_config(args.model_pos or args.model, **_engine_options(args))
    keys = tuple(k for k in (args.api_keys or "").split(",") if k)
    media = MediaConfig(allowed_media_dir=args.allowed_media_dir, allow_private=args.allow_private_media)
    if args.ui:
        _check_ui_extra()  # before the engine starts
    app = make_app(config, args.served_model_name, keys, args.max_queue_len, dict(args.adapters), args.lora_dir,
                   media, args.limit_images_per_prompt, tool_call_parser=args.tool_call_parser)
    if args.ui:
        from ui.mount import mount_ui

        mount_ui(app, keys)
    run(app, args.host, args.port)
    return 0


def _check_ui_extra() -> None:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError("the web chat needs gradio: pip install -e '.[ui]' (or `make setup`)") from None


def cmd_ui(args: argparse.Namespace) -> int:
    _check_ui_extra()
    from ui.standalone import run_ui

    run_ui(args.api_url, args.api_key, args.host, args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmq", description="lmq: LLM serving toolkit. With no --model, the built-in SmolLM2-135M-Instruct.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = sub.add_parser("generate", help="complete one or more prompts and print the text",
                         description="Complete prompts with the model, streaming the text.")
    gen.add_argument("prompt", nargs="+", help="prompt text (several prompts run one after another)")
    gen.add_argument("--chat", action="store_true",
                     help="wrap each prompt as a user chat message (implied by --chat-template)")
    gen.add_argument("--adapter", default=None, help="generate with this adapter (one of --adapters)")
    _engine_args(gen)
    _lora_args(gen)
    _sampling_args(gen, max_tokens=128)
    gen.set_defaults(func=cmd_generate)
    chat = sub.add_parser("chat", help="interactive chat in the terminal, streaming the answers",
                          description="Interactive chat with history, through the model's chat template.")
    chat.add_argument("--system", default=None, help="system prompt")
    _engine_args(chat)
    _sampling_args(chat, max_tokens=512)
    chat.set_defaults(func=cmd_chat)
    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)",
                         description="Serve the model over an OpenAI-compatible API until SIGINT/SIGTERM.")
    srv.add_argument("model_pos", nargs="?", metavar="MODEL", help="HF folder or .gguf (default: built-in model)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    srv.add_argument("--served-model-name", default=None, help="the `model` clients send (default: folder name)")
    srv.add_argument("--api-keys", "--api-key", default=None,
                     help="comma-separated keys; /v1/* then needs 'Bearer <key>'")
    srv.add_argument("--max-queue-len", type=int, default=None,
                     help="waiting requests before new ones get 429 (default: unbounded)")
    srv.add_argument("--lora-dir", default=None,
                     help="allow POST /v1/load_lora_adapter for folders inside this directory (enables LoRA)")
    srv.add_argument("--ui", action="store_true",
                     help="also serve the web chat at /ui (with --api-keys: log in with a key as the password)")
    _tool_args(srv)
    _engine_args(srv)
    _lora_args(srv)
    _vision_args(srv, server=True)
    srv.set_defaults(func=cmd_serve)
    web = sub.add_parser("ui", help="the web chat alone, against any OpenAI-compatible server",
                         description="Serve the Gradio web chat for the server at --api-url.")
    web.add_argument("--api-url", required=True, help="the server's API root, e.g. http://127.0.0.1:8000/v1")
    web.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY' (default: none)")
    web.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    web.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    web.set_defaults(func=cmd_ui)
    add_awq_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"lmq: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
