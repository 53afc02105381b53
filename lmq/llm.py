"""LLM: the offline Python API, shaped like vLLM's.

    from lmq import LLM, SamplingParams
    llm = LLM()                                   # the built-in default model
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    outs = llm.chat([{"role": "user", "content": "What is the capital of France?"}])

    llm = LLM(adapters={"sql": "/ckpt/sql-lora", "chat": "/ckpt/chat-lora"})   # peft folders
    outs = llm.generate(prompts, params, adapter=["sql", None, "chat"])      # per prompt; None = base

    llm = LLM("/models/llava-1.5-7b-hf")                                      # a LLaVA folder
    outs = llm.generate({"prompt": "USER: <image>\nWhat is this? ASSISTANT:",
                         "multi_modal_data": {"image": pil_image}})
    outs = llm.chat([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
        {"type": "text", "text": "What is this?"}]}])
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from lmq.backends import with_backend
from lmq.chat_content import template_messages
from lmq.config import CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig
from lmq.engine import LLMEngine
from lmq.models import model_config_from_hf
from lmq.sampling import SamplingParams
from lmq.sequence import RequestOutput
from lmq.tokenizer import Tokenizer
from lmq.weights import resolve_model
from vision.inputs import ImageInputs
from vision.media import MediaConfig

Message = dict
Prompt = str | list[int] | dict  # a dict: {"prompt" | "prompt_token_ids": ..., "multi_modal_data": {"image": ...}}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_engine_config(model: str | None = None, *, backend: str = "auto", dtype: str = "auto",
                        device: str | None = None, block_size: int = 16, num_kv_blocks: int | None = None,
                        gpu_memory_utilization: float = 0.9, kv_cache_gb: float = 2.0,
                        max_num_batched_tokens: int | None = None, max_num_seqs: int = 256,
                        max_model_len: int | None = None, enable_prefix_caching: bool = True,
                        enable_cuda_graph: bool = True, seed: int = 0, enable_lora: bool = False,
                        max_loras: int = 8, max_lora_rank: int = 64, max_cpu_loras: int | None = None,
                        vision_devices: Sequence[str] = (), vision_max_batch_size: int = 16) -> EngineConfig:
    """Options as the CLI and LLM take them -> a validated EngineConfig."""
    from transformers import AutoConfig, GenerationConfig

    path = resolve_model(model)
    device = device or default_device()
    hf = AutoConfig.from_pretrained(path)
    try:
        gen_eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:
        gen_eos = None
    mcfg = model_config_from_hf(path, hf, dtype, device, max_model_len, gen_eos)
    budget = max_num_batched_tokens or (8192 if device.startswith("cuda") else 2048)
    config = EngineConfig(
        model=mcfg,
        cache=CacheConfig(block_size=block_size, num_kv_blocks=num_kv_blocks,
                          gpu_memory_utilization=gpu_memory_utilization, kv_cache_gb=kv_cache_gb,
                          enable_prefix_caching=enable_prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                  max_model_len=mcfg.max_model_len),
        lora=LoRAConfig(max_loras=max_loras, max_lora_rank=max_lora_rank,
                        max_cpu_loras=max_cpu_loras or max(max_loras, 32)) if enable_lora else None,
        device=device,
        enable_cuda_graph=enable_cuda_graph,
        seed=seed,
        vision_devices=tuple(vision_devices),
        vision_max_batch_size=vision_max_batch_size,
    )
    return with_backend(backend, config)


class LLM:
    def __init__(self, model: str | None = None, adapters: dict[str, str] | None = None,
                 allowed_media_dir: str | None = None, allow_private_media: bool = False,
                 **options: object) -> None:
        """adapters: name -> peft LoRA folder, loaded at start (enables LoRA; so does
        `enable_lora=True` for adapters loaded later with `load_adapter`). allowed_media_dir /
        allow_private_media: what image URLs `chat` may read (see vision.media)."""
        if adapters:
            options["enable_lora"] = True
        config = build_engine_config(model, **options)  # type: ignore[arg-type]
        self.tokenizer = Tokenizer(config.model.path)
        self.engine = LLMEngine(config, self.tokenizer)
        self.images = ImageInputs(config.model, MediaConfig(allowed_media_dir, allow_private_media))
        self._ids = itertools.count()
        for name, path in (adapters or {}).items():
            self.load_adapter(name, path)

    def load_adapter(self, name: str, path: str) -> None:
        """Load a peft LoRA folder under `name`; requests may use it at once."""
        self.engine.load_adapter(name, str(path))

    def unload_adapter(self, name: str) -> None:
        self.engine.unload_adapter(name)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False, adapter: str | None | Sequence[str | None] = None) -> list[RequestOutput]:
        """prompts: a string, a list of token ids, or a list of either. adapter: one name for
        every prompt, or one name (None = the base model) per prompt. Outputs in input order."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        params_list = self._params_per_prompt(params, len(prompts))
        adapters = [adapter] * len(prompts) if adapter is None or isinstance(adapter, str) else list(adapter)
        if len(adapters) != len(prompts):
            raise ValueError(f"got {len(adapters)} adapter names for {len(prompts)} prompts")
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
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[Message] | list[list[Message]], params: SamplingParams | None = None,
             use_tqdm: bool = False, adapter: str | None | Sequence[str | None] = None,
             tools: list[dict] | None = None) -> list[RequestOutput]:
        """One conversation or a list of them, through the model's chat template. tools: OpenAI
        function tools for the template; lmq.tool_parsers reads the calls in the output."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conv in convs:
            msgs, refs = template_messages(conv)  # type: ignore[arg-type]
            ids = self.tokenizer.apply_chat_template(msgs, tools=tools)
            prompts.append({"prompt_token_ids": ids, "multi_modal_data": {"image": self.images.load(refs)}}
                           if refs else ids)
        return self.generate(prompts, params, use_tqdm, adapter)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None,
               adapter: str | None = None) -> Iterator[str]:
        """Yields text deltas of one request as they are produced (n = 1)."""
        rid = f"stream-{next(self._ids)}"
        self.engine.add_request(rid, prompt, params or SamplingParams(), stream=True, adapter=adapter)
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

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Generating", disable=not use_tqdm)
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
