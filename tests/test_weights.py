"""Model loading: sharded safetensors, GGUF conversion, the built-in default model, and the
errors a broken folder or an unsupported architecture gives."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import hf_greedy, make_tokenizer, random_prompts
from lmq import LLM, SamplingParams
from lmq.weights import default_gguf_path, resolve_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
CHAT_Q = [{"role": "user", "content": "What is the capital of France?"}]


def test_sharded_safetensors_match_transformers(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"]).save_pretrained(folder, max_shard_size="100KB")
    shutil.copy(tiny_models["qwen2"] / "tokenizer.json", folder)
    shutil.copy(tiny_models["qwen2"] / "tokenizer_config.json", folder)
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 2
    prompts = random_prompts(3, [5, 40], seed=21)
    llm = LLM(str(folder), device="cpu", kv_cache_gb=0.05)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    assert got == hf_greedy(folder, prompts, 12)


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_missing_weights_and_missing_tensor(tiny_models, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_models["llama"], folder)
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no weights in"):
        LLM(str(folder), device="cpu")
    dropped = next(k for k in weights if "down_proj" in k)
    save_file({k: v for k, v in weights.items() if k != dropped}, folder / "model.safetensors")
    with pytest.raises(ValueError, match="missing weights for: layers.*down_proj"):
        LLM(str(folder), device="cpu")


def test_wrong_shape_names_the_weight(tiny_models, tmp_path):
    folder = tmp_path / "badshape"
    shutil.copytree(tiny_models["llama"], folder)
    weights = load_file(folder / "model.safetensors")
    key = next(k for k in weights if k.endswith("q_proj.weight"))
    weights[key] = torch.randn(3, 3)
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"q_proj.weight.*shape \(3, 3\)"):
        LLM(str(folder), device="cpu")


def test_unsupported_architecture_is_named(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300)).save_pretrained(tmp_path)
    make_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="'GPT2LMHeadModel'.*supported are LlamaForCausalLM"):
        LLM(str(tmp_path), device="cpu")


def test_unsupported_rope_and_bad_dtype(tiny_models, tmp_path):
    folder = tmp_path / "rope"
    shutil.copytree(tiny_models["llama"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope_type='dynamic' is not supported"):
        LLM(str(folder), device="cpu")
    with pytest.raises(ValueError, match="dtype='float8'"):
        LLM(str(tiny_models["llama"]), device="cpu", dtype="float8")


def test_default_model_answers_paris():
    llm = LLM(device="cpu")
    out = llm.chat(CHAT_Q, SamplingParams(temperature=0.0, max_tokens=24))
    assert "Paris" in out[0].outputs[0].text


def test_gguf_file_converts_once(tmp_path, monkeypatch):
    monkeypatch.setenv("LMQ_HOME", str(tmp_path))
    gguf = default_gguf_path()
    folder = resolve_model(str(gguf))
    assert folder.startswith(str(tmp_path)) and (tmp_path / "models").is_dir()
    marker = next((tmp_path / "models").glob("*/.lmq-converted"))
    stamp = marker.stat().st_mtime_ns
    assert resolve_model(str(gguf)) == folder and marker.stat().st_mtime_ns == stamp  # reused, not redone
    llm = LLM(str(gguf), device="cpu", dtype="float32")
    assert "Paris" in llm.chat(CHAT_Q, SamplingParams(temperature=0.0, max_tokens=24))[0].outputs[0].text


@pytest.mark.parametrize("cfg_dtype, device, expected", [
    ("bfloat16", "cuda", torch.bfloat16), ("float16", "cuda:1", torch.float16), ("float32", "cuda", torch.float32),
    (None, "cuda", torch.bfloat16), ("bfloat16", "cpu", torch.float32),
])
def test_auto_dtype_follows_checkpoint_on_gpu_and_is_float32_on_cpu(cfg_dtype, device, expected):
    from types import SimpleNamespace

    from lmq.models import resolve_dtype

    assert resolve_dtype("auto", SimpleNamespace(dtype=cfg_dtype), device) is expected
    assert resolve_dtype("float16", SimpleNamespace(dtype=cfg_dtype), device) is torch.float16
