"""LLM: the offline Python API, shaped like vLLM's.

    from lmq import LLM, SamplingParams
    llm = LLM()                                   # the built-in default model
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    outs = llm.chat([{"role": "user", "content": "What is the capital of France?"}])

    llm = LLM(adapters={"sql": "/ckpt/sql-lora", "chat": "/ckpt/chat-lora"})   # peft folders
    outs = llm.generate(prompts, params, adapter=["sql", None, "chat"])      # per prompt; None = base

    # vLLM's spelling runs unchanged: LoRARequest(name, id, path), TokensPrompt dicts, ...
    llm = LLM(model="/models/llama", enable_lora=True, enforce_eager=True, seed=0)
    outs = llm.generate([{"prompt_token_ids": [1, 2, 3]}], sampling_params=SamplingParams(temperature=0),
                        lora_request=LoRARequest("sql", 1, "/ckpt/sql-lora"))

    llm = LLM("/models/llava-1.5-7b-hf")                                      # a LLaVA folder
    outs = llm.generate({"prompt": "USER: <image>\nWhat is this? ASSISTANT:",
                         "multi_modal_data": {"image": pil_image}})
    outs = llm.chat([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
        {"type": "text", "text": "What is this?"}]}])
"""

from __future__ import annotations

import inspect
import itertools
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from lmq.backends import with_backend
from lmq.chat_content import template_messages
from lmq.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
from lmq.engine import LLMEngine
from lmq.inputs import PromptType
from lmq.lora_request import LoRARequest
from lmq.models import model_config_from_hf
from lmq.sampling import SamplingParams
from lmq.sequence import RequestOutput
from lmq.tokenizer import Tokenizer, load_chat_template
from lmq.weights import resolve_model
from vision.inputs import ImageInputs
from vision.media import MediaConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Message = dict
Prompt = PromptType  # a dict: {"prompt" | "prompt_token_ids": ..., "multi_modal_data": {"image": ...}}


# vLLM's dtype names beside torch's
DTYPE_ALIASES = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16"}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _refuse_unservable(model: ModelConfig, tensor_parallel_size: int, pipeline_parallel_size: int,
                       quantization: str | None, tokenizer_mode: str, kv_cache_dtype: str) -> None:
    """vLLM options lmq has one value for: any other is an error, never silently ignored."""
    for name, value in (("tensor_parallel_size", tensor_parallel_size),
                        ("pipeline_parallel_size", pipeline_parallel_size)):
        if value != 1:
            raise ValueError(f"{name}={value!r} is not supported: lmq runs a model on one GPU (must be 1); "
                             "serve more replicas behind a load balancer instead")
    if quantization not in (None, "awq"):
        raise ValueError(f"quantization={quantization!r} is not supported: must be None (the checkpoint's own) or "
                         "'awq' (an AutoAWQ GEMM checkpoint; `lmq awq` makes one)")
    if quantization == "awq" and model.quant is None:
        raise ValueError(f"quantization='awq' does not match the checkpoint: {model.path} has no AWQ "
                         "quantization_config (quantize it with `lmq awq`, or pass quantization=None)")
    if tokenizer_mode != "auto":
        raise ValueError(f"tokenizer_mode={tokenizer_mode!r} is not supported: must be 'auto' (lmq uses the "
                         "fast tokenizer of tokenizer.json)")
    if kv_cache_dtype != "auto":
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is not supported: must be 'auto' (the KV cache "
                         "has the model's dtype)")


def build_engine_config(model: str | None = None, *, backend: str = "auto", dtype: str | torch.dtype = "auto",
                        device: str | None = None, block_size: int = 16, num_kv_blocks: int | None = None,
                        gpu_memory_utilization: float = 0.9, kv_cache_gb: float = 2.0,
                        max_num_batched_tokens: int | None = None, max_num_seqs: int = 256,
                        max_model_len: int | None = None, enable_prefix_caching: bool = True,
                        enable_cuda_graph: bool = True, enforce_eager: bool = False, seed: int | None = 0,
                        enable_lora: bool = False, max_loras: int = 8, max_lora_rank: int = 64,
                        max_cpu_loras: int | None = None, vision_devices: Sequence[str] = (),
                        vision_max_batch_size: int = 16, tokenizer: str | None = None,
                        chat_template: str | None = None, trust_remote_code: bool = False,
                        enable_chunked_prefill: bool | None = None, tensor_parallel_size: int = 1,
                        pipeline_parallel_size: int = 1, quantization: str | None = None,
                        tokenizer_mode: str = "auto", kv_cache_dtype: str = "auto",
                        async_scheduling: bool = False) -> EngineConfig:
    """Options as the CLI and LLM take them (lmq's names and vLLM's) -> a validated EngineConfig.
    enforce_eager (vLLM) = not enable_cuda_graph. enable_chunked_prefill=False: whole prompts
    in one step (the token budget grows to max_model_len). chat_template: a file or the text.
    seed=None (vLLM's "no seed"): one is drawn from the OS, and the config records it."""
    from transformers import AutoConfig, GenerationConfig

    path = resolve_model(model)
    device = device or default_device()
    hf = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    try:
        gen_eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:
        gen_eos = None
    dtype = DTYPE_ALIASES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    mcfg = model_config_from_hf(path, hf, dtype, device, max_model_len, gen_eos)
    _refuse_unservable(mcfg, tensor_parallel_size, pipeline_parallel_size, quantization, tokenizer_mode,
                       kv_cache_dtype)
    budget = max_num_batched_tokens or (8192 if device.startswith("cuda") else 2048)
    if enable_chunked_prefill is False:
        budget = max(budget, mcfg.max_model_len)
    config = EngineConfig(
        model=mcfg,
        cache=CacheConfig(block_size=block_size, num_kv_blocks=num_kv_blocks,
                          gpu_memory_utilization=gpu_memory_utilization, kv_cache_gb=kv_cache_gb,
                          enable_prefix_caching=enable_prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                  max_model_len=mcfg.max_model_len, async_scheduling=async_scheduling),
        lora=LoRAConfig(max_loras=max_loras, max_lora_rank=max_lora_rank,
                        max_cpu_loras=max_cpu_loras or max(max_loras, 32)) if enable_lora else None,
        device=device,
        enable_cuda_graph=enable_cuda_graph and not enforce_eager,
        seed=random.SystemRandom().randrange(2**63) if seed is None else seed,
        vision_devices=tuple(vision_devices),
        vision_max_batch_size=vision_max_batch_size,
        tokenizer=str(Path(tokenizer).expanduser()) if tokenizer else None,
        chat_template=load_chat_template(chat_template) if chat_template is not None else None,
        trust_remote_code=trust_remote_code,
    )
    return with_backend(backend, config)


ENGINE_OPTIONS = frozenset(inspect.signature(build_engine_config).parameters) - {"model"}


class LLM:
    def __init__(self, model: str | None = None, adapters: dict[str, str] | None = None,
                 allowed_media_dir: str | None = None, allow_private_media: bool = False,
                 **options: object) -> None:
        """options: build_engine_config's, under lmq's or vLLM's names (enforce_eager, seed,
        tokenizer, ...); one lmq cannot honour is a ValueError. adapters: name -> peft LoRA
        folder, loaded at start (enables LoRA; so does `enable_lora=True` for adapters loaded
        later, by `load_adapter` or a LoRARequest). allowed_media_dir / allow_private_media: what
        image URLs `chat` may read (see vision.media)."""
        unknown = sorted(set(options) - ENGINE_OPTIONS)
        if unknown:
            raise TypeError(f"LLM() got an unexpected keyword argument {unknown[0]!r}")
        if adapters:
            options["enable_lora"] = True
        config = build_engine_config(model, **options)  # type: ignore[arg-type]
        self.tokenizer = Tokenizer.for_config(config)
        self.engine = LLMEngine(config, self.tokenizer)
        self.images = ImageInputs(config.model, MediaConfig(allowed_media_dir, allow_private_media))
        self._ids = itertools.count()
        self._adapter_paths: dict[str, str] = {}
        self._lora_ids: dict[int, LoRARequest] = {}
        for name, path in (adapters or {}).items():
            self.load_adapter(name, path)

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        """The HF tokenizer (as vLLM's `LLM.get_tokenizer`)."""
        return self.tokenizer.hf

    def load_adapter(self, name: str, path: str) -> None:
        """Load a peft LoRA folder under `name`; requests may use it at once."""
        self.engine.load_adapter(name, str(path))
        self._adapter_paths[name] = str(path)

    def unload_adapter(self, name: str) -> None:
        self.engine.unload_adapter(name)
        self._adapter_paths.pop(name, None)
        self._lora_ids = {i: r for i, r in self._lora_ids.items() if r.lora_name != name}

    def _lora_adapter(self, req: LoRARequest | None) -> str | None:
        """The adapter name a LoRARequest stands for, loading its folder the first time."""
        if req is None:
            return None
        if not isinstance(req, LoRARequest):
            raise TypeError(f"lora_request must be a LoRARequest or None, got {type(req).__name__}")
        known = self._lora_ids.get(req.lora_int_id)
        if known is not None and (known.lora_name, known.lora_path) != (req.lora_name, req.lora_path):
            raise ValueError(f"lora_int_id={req.lora_int_id} already stands for adapter {known.lora_name!r} at "
                             f"{known.lora_path!r}; give {req.lora_name!r} at {req.lora_path!r} another id")
        loaded = self._adapter_paths.get(req.lora_name)
        if loaded is None:
            self.load_adapter(req.lora_name, req.lora_path)
        elif Path(loaded).resolve() != Path(req.lora_path).expanduser().resolve():
            raise ValueError(f"lora_name={req.lora_name!r} is already loaded from {loaded!r}, not "
                             f"lora_path={req.lora_path!r}: give this adapter another name")
        self._lora_ids[req.lora_int_id] = req
        return req.lora_name

    def _adapters_per_prompt(self, n: int, adapter: str | None | Sequence[str | None],
                             lora_request: LoRARequest | Sequence[LoRARequest | None] | None) -> list[str | None]:
        if lora_request is not None:
            if adapter is not None:
                raise ValueError("give adapter= (lmq's names) or lora_request= (vLLM's), not both")
            reqs = [lora_request] * n if isinstance(lora_request, LoRARequest) else list(lora_request)
            if len(reqs) != n:
                raise ValueError(f"got {len(reqs)} lora_requests for {n} prompts")
            return [self._lora_adapter(r) for r in reqs]
        names = [adapter] * n if adapter is None or isinstance(adapter, str) else list(adapter)
        if len(names) != n:
            raise ValueError(f"got {len(names)} adapter names for {n} prompts")
        return names

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool | Callable[..., tqdm] = True,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
                 adapter: str | None | Sequence[str | None] = None) -> list[RequestOutput]:
        """prompts: a string, a list of token ids, a TextPrompt / TokensPrompt dict, or a list of
        these. sampling_params: one for every prompt or one per prompt. The adapter, per request
        or per prompt: lora_request (vLLM's LoRARequest) or adapter (a loaded adapter's name;
        None = the base model). use_tqdm: a progress bar over the prompts (or a tqdm-like
        class to draw it with). Outputs in input order."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        params_list = self._params_per_prompt(sampling_params, len(prompts))
        if lora_request is not None and not isinstance(lora_request, LoRARequest):
            lora_request = list(lora_request)  # (read twice below)
        adapters = self._adapters_per_prompt(len(prompts), adapter, lora_request)
        loras = [lora_request] * len(prompts) if lora_request is None or isinstance(lora_request, LoRARequest) \
            else list(lora_request)
        ids = []
        try:
            for p, sp, name in zip(prompts, params_list, adapters):
                rid = f"gen-{next(self._ids)}"
                prompt, images = self.images.from_prompt(p)
                self.engine.add_request(rid, prompt, sp, adapter=name, images=images)
                ids.append(rid)
        except Exception:
            for rid in ids:
                self.engine.abort(rid)
            raise
        outs = self._run(ids, use_tqdm)
        for out, lora in zip(outs, loras):
            out.lora_request = lora
        return outs

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool | Callable[..., tqdm] = True,
             lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             adapter: str | None | Sequence[str | None] = None,
             tools: list[dict] | None = None) -> list[RequestOutput]:
        """One conversation or a list of them, through the model's chat template (or
        `chat_template`: a file or the Jinja text, for this call). tools: OpenAI function tools
        for the template; lmq.tool_parsers reads the calls in the output."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        template = load_chat_template(chat_template) if chat_template is not None else None
        prompts = []
        for conv in convs:
            msgs, refs = template_messages(conv)  # type: ignore[arg-type]
            ids = self.tokenizer.apply_chat_template(msgs, add_generation_prompt, template, tools=tools)
            prompts.append({"prompt_token_ids": ids, "multi_modal_data": {"image": self.images.load(refs)}}
                           if refs else ids)
        return self.generate(prompts, sampling_params, use_tqdm, lora_request, adapter)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
               adapter: str | None = None) -> Iterator[str]:
        """Yields text deltas of one request as they are produced (n = 1)."""
        rid = f"stream-{next(self._ids)}"
        self.engine.add_request(rid, prompt, sampling_params or SamplingParams(), stream=True, adapter=adapter)
        sent = 0
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id != rid:
                        continue
                    text = out.outputs[0].text
                    if len(text) > sent:
                        yield text[sent:]
                        sent = len(text)
                    if out.finished:
                        return
        finally:
            self.engine.abort(rid)

    @staticmethod
    def _params_per_prompt(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * n
        if isinstance(params, SamplingParams):
            return [params] * n
        params = list(params)
        if len(params) != n:
            raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
        return params

    def _run(self, ids: list[str], use_tqdm: bool | Callable[..., tqdm]) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar_class = use_tqdm if callable(use_tqdm) else tqdm
        bar = bar_class(total=len(ids), desc="Processed prompts", disable=not use_tqdm)
        try:
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
                for rid, error in self.engine.take_failures():
                    if rid in ids:
                        raise error
        finally:  # an exception or Ctrl-C leaves no request behind in the engine
            for rid in ids:
                if rid not in done:
                    self.engine.abort(rid)
            bar.close()
        return [done[i] for i in ids]
