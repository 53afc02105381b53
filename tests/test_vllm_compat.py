"""vLLM's offline API and CLI flag names on lmq: a script written for vLLM runs unchanged and
gives lmq's (and peft's) greedy tokens; what lmq cannot honour is refused by name."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from lora_fixtures import peft_greedy

from conftest import CHATML, CORPUS, random_prompts
from lmq import LLM, LoRARequest, SamplingParams, TextPrompt, TokensPrompt
from lmq.cli import _engine_options, build_parser
from lmq.llm import build_engine_config

# As a vLLM user writes it (vLLM's docs, offline inference with LoRA), `vllm` -> `lmq`.
VLLM_SCRIPT = '''
import json
import sys

from lmq import LLM, SamplingParams
from lmq import LoRARequest

model, sql_lora_path, other_lora_path = sys.argv[1:4]

if __name__ == "__main__":
    llm = LLM(model=model, enable_lora=True, max_loras=2, max_lora_rank=64, seed=0, enforce_eager=True,
              dtype="float32", max_model_len=512, gpu_memory_utilization=0.9, tensor_parallel_size=1,
              enable_prefix_caching=True, trust_remote_code=False)
    sampling_params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = ["The quick brown fox", "What is the capital of France?", "Blocked KV caches"]
    outputs = llm.generate(prompts, sampling_params, lora_request=LoRARequest("sql-lora", 1, sql_lora_path))
    mixed = llm.generate(prompts, sampling_params=sampling_params, use_tqdm=False,
                         lora_request=[LoRARequest("sql-lora", 1, sql_lora_path), None,
                                       LoRARequest("other-lora", 2, other_lora_path)])
    result = []
    for output in outputs + mixed:
        completion = output.outputs[0]
        result.append({"prompt": output.prompt, "prompt_token_ids": output.prompt_token_ids,
                       "text": completion.text, "token_ids": list(completion.token_ids),
                       "finish_reason": completion.finish_reason})
    print(json.dumps(result))
'''

ROOT = Path(__file__).resolve().parents[1]


def _run(argv: list[str], input: str | None = None, **kwargs: object) -> subprocess.CompletedProcess:
    """A fresh Python process importing this checkout's lmq (not whichever one is installed).
    Its output is decoded as UTF-8 without newline translation: a generated "\\r" stays one."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "PYTHONIOENCODING": "utf-8"}
    run = subprocess.run([sys.executable, *argv], input=None if input is None else input.encode(),
                         capture_output=True, timeout=300, env=env, **kwargs)
    return subprocess.CompletedProcess(run.args, run.returncode, run.stdout.decode(), run.stderr.decode())


def _lmq(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return _run(["-m", "lmq.cli", *args], input=stdin)


PROMPTS = ["The quick brown fox", "What is the capital of France?", "Blocked KV caches"]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _llm(path: Path, **opts: object) -> LLM:
    return LLM(str(path), device="cpu", dtype="float32", kv_cache_gb=0.05, **opts)


@pytest.fixture(scope="module")
def base(tiny_models) -> Path:
    return tiny_models["llama"]


def test_vllm_script_runs_unchanged_and_matches_lmq_and_peft(base, lora_adapters, tmp_path):
    script = tmp_path / "offline_lora.py"
    script.write_text(VLLM_SCRIPT)
    run = _run([str(script), str(base), lora_adapters["qv4"], lora_adapters["all8"]], cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    assert "Processed prompts" in run.stderr  # the first generate's tqdm bar (on by default)
    llm = _llm(base, adapters={"sql": lora_adapters["qv4"], "other": lora_adapters["all8"]})
    own = llm.generate(PROMPTS, GREEDY, use_tqdm=False, adapter="sql") + \
        llm.generate(PROMPTS, GREEDY, use_tqdm=False, adapter=["sql", None, "other"])
    for g, o in zip(got, own, strict=True):
        assert (g["prompt"], g["prompt_token_ids"], g["token_ids"], g["text"], g["finish_reason"]) == \
            (o.prompt, o.prompt_token_ids, o.outputs[0].token_ids, o.outputs[0].text, "length")
    # ... and both are peft's tokens with that adapter alone
    ids = [o.prompt_token_ids for o in own[:3]]
    for adapter, rows in ((lora_adapters["qv4"], [0, 1, 2, 3]), (None, [4]), (lora_adapters["all8"], [5])):
        ref = peft_greedy(base, adapter, [ids[i % 3] for i in rows], 8)
        assert [got[i]["token_ids"] for i in rows] == ref


def test_lora_request_reuses_and_refuses(base, lora_adapters):
    llm = _llm(base, enable_lora=True)
    a = LoRARequest("a", 1, lora_adapters["qv4"])
    first = llm.generate(PROMPTS[0], GREEDY, use_tqdm=False, lora_request=a)[0]
    assert first.lora_request is a and first.outputs[0].finished()
    again = llm.generate(PROMPTS[0], GREEDY, use_tqdm=False, lora_request=LoRARequest("a", 1, lora_adapters["qv4"]))
    assert again[0].outputs[0].token_ids == first.outputs[0].token_ids
    assert llm.engine.adapters.registry.keys() == {"a"}  # loaded once
    with pytest.raises(ValueError, match="lora_int_id=1 already stands for adapter 'a'"):
        llm.generate(PROMPTS[0], GREEDY, lora_request=LoRARequest("b", 1, lora_adapters["all8"]))
    with pytest.raises(ValueError, match="lora_name='a' is already loaded from"):
        llm.generate(PROMPTS[0], GREEDY, lora_request=LoRARequest("a", 2, lora_adapters["all8"]))
    with pytest.raises(ValueError, match="not both"):
        llm.generate(PROMPTS[0], GREEDY, lora_request=a, adapter="a")
    with pytest.raises(ValueError, match="lora_int_id=0 is invalid"):
        LoRARequest("a", 0, lora_adapters["qv4"])
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        _llm(base).generate(PROMPTS[0], GREEDY, lora_request=a)


@pytest.mark.parametrize("option, value, message", [
    ("tensor_parallel_size", 2, "tensor_parallel_size=2 is not supported"),
    ("pipeline_parallel_size", 4, "pipeline_parallel_size=4 is not supported"),
    ("quantization", "gptq", "quantization='gptq' is not supported"),
    ("quantization", "awq", "quantization='awq' does not match the checkpoint"),
    ("tokenizer_mode", "slow", "tokenizer_mode='slow' is not supported"),
    ("kv_cache_dtype", "fp8", "kv_cache_dtype='fp8' is not supported"),
    ("dtype", "int8", "dtype='int8' is invalid"),
    ("chat_template", "no_such_template.jinja", "chat_template='no_such_template.jinja' is neither a file"),
])
def test_unservable_options_are_refused_by_name(base, option, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        LLM(str(base), device="cpu", **{option: value})


def test_unknown_option_is_a_type_error(base):
    with pytest.raises(TypeError, match="LLM\\(\\) got an unexpected keyword argument 'swap_spaces'"):
        LLM(str(base), swap_spaces=4)


def test_honoured_options_reach_the_config(base):
    c = build_engine_config(str(base), device="cpu", enforce_eager=True, seed=7, dtype="half", max_model_len=300,
                            enable_chunked_prefill=False, max_num_batched_tokens=64, enable_prefix_caching=False)
    assert (c.enable_cuda_graph, c.seed, str(c.model.dtype), c.scheduler.max_model_len) == \
        (False, 7, "torch.float16", 300)
    assert c.scheduler.max_num_batched_tokens == 300  # no chunking: a whole prompt fits one step
    assert c.cache.enable_prefix_caching is False
    assert build_engine_config(str(base), device="cpu").enable_cuda_graph is True
    seeds = {build_engine_config(str(base), device="cpu", seed=None).seed for _ in range(2)}
    assert len(seeds) == 2 and all(isinstance(s, int) for s in seeds)  # vLLM's "no seed": a fresh one
    with pytest.raises(ValueError, match="seed=-1 is invalid"):
        build_engine_config(str(base), device="cpu", seed=-1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=1, best_of=2), "best_of=2 is invalid"),
    (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens=0 is invalid"),
    (dict(detokenize=False, stop=["x"]), "empty when detokenize=False"),
    (dict(spaces_between_special_tokens=False, skip_special_tokens=False), "spaces_between_special_tokens=False is"),
])
def test_sampling_params_vllm_names_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_vllm_names_accepted():
    p = SamplingParams(n=2, best_of=2, truncate_prompt_tokens=-1, spaces_between_special_tokens=False, detokenize=False)
    assert (p.best_of, p.truncate_prompt_tokens, p.spaces_between_special_tokens, p.detokenize) == (2, -1, False, False)


def test_no_global_seed_and_seeded_runs_repeat(base):
    import torch

    state = torch.random.get_rng_state()
    sample = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    runs = [[o.outputs[0].token_ids for o in _llm(base, seed=s).generate(PROMPTS, sample, use_tqdm=False)]
            for s in (3, 3, 4)]
    assert torch.equal(torch.random.get_rng_state(), state)  # LLM() leaves torch's global generator alone
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_decoded_token_and_output_fields(base):
    llm = _llm(base)
    tok = llm.get_tokenizer()
    out = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3,
                                                  prompt_logprobs=2), use_tqdm=False)[0]
    c = out.outputs[0]
    assert len(c.logprobs) == len(c.token_ids) == 6 and out.prompt_logprobs[0] is None
    for entry in c.logprobs + out.prompt_logprobs[1:]:
        for token_id, lp in entry.items():
            want = tok.decode([token_id], skip_special_tokens=False) if token_id < len(tok) else ""
            assert lp.decoded_token == want, (token_id, lp)
    assert c.cumulative_logprob == pytest.approx(sum(e[t].logprob for e, t in zip(c.logprobs, c.token_ids)))
    assert any(lp.decoded_token for e in c.logprobs for lp in e.values())  # not all empty
    assert (c.index, c.finish_reason, out.finished, out.prompt) == (0, "length", True, PROMPTS[1])


def test_detokenize_false_and_truncate_prompt_tokens(base):
    llm = _llm(base)
    ids = random_prompts(1, [40], seed=5)[0]
    full = llm.generate([ids], GREEDY, use_tqdm=False)[0].outputs[0]
    bare = llm.generate([ids], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, detokenize=False),
                        use_tqdm=False)[0].outputs[0]
    assert (bare.text, bare.token_ids) == ("", full.token_ids)
    cut = llm.generate([ids], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, truncate_prompt_tokens=9),
                       use_tqdm=False)[0]
    assert cut.prompt_token_ids == ids[-9:]
    assert cut.outputs[0].token_ids == llm.generate([ids[-9:]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_text_and_tokens_prompts(base):
    from conftest import hf_greedy

    llm = _llm(base)
    ids = random_prompts(2, [7, 13], seed=9)
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids[0]), TextPrompt(prompt=PROMPTS[0]),
                         {"prompt_token_ids": ids[1]}], GREEDY, use_tqdm=False)
    text_ids = llm.get_tokenizer().encode(PROMPTS[0])
    assert [o.prompt_token_ids for o in outs] == [ids[0], text_ids, ids[1]]
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(base, [ids[0], text_ids, ids[1]], 8)
    with pytest.raises(ValueError, match="unsupported keys \\['prompt_embeds'\\]"):
        llm.generate({"prompt_embeds": [0.0]}, GREEDY)


def test_use_tqdm(base, capsys):
    llm = _llm(base)
    llm.generate(PROMPTS, GREEDY)
    assert "Processed prompts" in capsys.readouterr().err
    llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert "Processed prompts" not in capsys.readouterr().err
    from tqdm import tqdm

    made = []

    class Bar(tqdm):
        def __init__(self, *args, **kwargs):
            made.append(kwargs["total"])
            super().__init__(*args, **kwargs)

    llm.generate(PROMPTS, GREEDY, use_tqdm=Bar)
    assert made == [3]


def _split_tokenizer(base: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The model folder without its tokenizer, and a tokenizer folder of another vocabulary
    (fewer merges than the model's own), so which one is used shows in the token ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    model = tmp_path / "model"
    model.mkdir()
    for f in base.iterdir():
        if f.name.endswith((".json", ".safetensors")) and "token" not in f.name:
            shutil.copy(f, model / f.name)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=270, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    folder = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>") \
        .save_pretrained(folder)
    return model, folder


def test_tokenizer_folder_separate_from_model(base, tmp_path):
    from transformers import AutoTokenizer

    model, tok = _split_tokenizer(base, tmp_path)
    with pytest.raises((OSError, ValueError)):
        LLM(str(model), device="cpu", kv_cache_gb=0.05)  # no tokenizer in the model folder
    ref = AutoTokenizer.from_pretrained(tok)
    text = "What is the capital of France?"
    assert ref.encode(text) != AutoTokenizer.from_pretrained(base).encode(text)
    llm = _llm(model, tokenizer=str(tok))
    out = llm.generate(text, GREEDY, use_tqdm=False)[0]
    assert out.prompt_token_ids == ref.encode(text) and llm.get_tokenizer().vocab == ref.vocab
    # the CLI flag builds the same config, and `lmq generate --tokenizer` runs with it
    args = build_parser().parse_args(["generate", "x", "--model", str(model), "--tokenizer", str(tok)])
    assert build_engine_config(args.model, **_engine_options(args)).tokenizer == str(tok)
    run = _lmq("generate", text, "--model", str(model), "--tokenizer", str(tok), "--device", "cpu",
               "--max-tokens", "8", "--kv-cache-gb", "0.05")
    assert run.returncode == 0, run.stderr
    ids = llm.generate(text, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0].outputs[0].text
    assert run.stdout == ids + "\n"
    with pytest.raises(FileNotFoundError, match="tokenizer='/nonexistent/tok' is not a folder"):
        _llm(base, tokenizer="/nonexistent/tok")


CUSTOM = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}" \
    "[assistant]{% endif %}"
MSGS = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_template_file_inline_and_per_call(base, tmp_path):
    from jinja2 import Template

    tok = _llm(base).get_tokenizer()
    rendered = Template(CUSTOM).render(messages=MSGS, add_generation_prompt=True)
    want = tok.encode(rendered, add_special_tokens=False)
    path = tmp_path / "template.jinja"
    path.write_text(CUSTOM)
    for value in (str(path), CUSTOM):
        llm = _llm(base, chat_template=value)
        assert llm.engine.config.chat_template == CUSTOM
        assert llm.chat(MSGS, GREEDY, use_tqdm=False)[0].prompt_token_ids == want
    default = _llm(base)
    chatml = tok.encode(Template(CHATML).render(messages=MSGS, add_generation_prompt=True), add_special_tokens=False)
    assert default.chat(MSGS, GREEDY, use_tqdm=False)[0].prompt_token_ids == chatml
    assert default.chat(MSGS, GREEDY, use_tqdm=False, chat_template=str(path))[0].prompt_token_ids == want


def test_chat_template_in_the_cli_and_the_engine_process(base, tmp_path):
    import asyncio

    from lmq.async_engine import AsyncEngine

    path = tmp_path / "template.jinja"
    path.write_text(CUSTOM)
    run = _lmq("chat", "--model", str(base), "--chat-template", str(path), "--device", "cpu", "--max-tokens", "6",
               "--kv-cache-gb", "0.05", stdin=MSGS[0]["content"] + "\n/exit\n")
    assert run.returncode == 0, run.stderr
    llm = _llm(base, chat_template=CUSTOM)
    want = llm.chat(MSGS, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0].outputs[0].text
    assert run.stdout == "> " + want + "\n> "
    # serve's path: the AsyncEngine's tokenizer (the front end's) takes the config's template
    config = build_engine_config(str(base), device="cpu", kv_cache_gb=0.05, chat_template=str(path))
    engine = AsyncEngine(config)
    try:
        ids = engine.tokenizer.apply_chat_template(MSGS)
        assert ids == llm.tokenizer.apply_chat_template(MSGS)

        async def one() -> list[int]:
            stream = engine.add_request("r", ids, GREEDY, stream=False)
            out = [o async for o in stream][-1]
            return out.outputs[0].token_ids
        assert asyncio.run(one()) == llm.generate([ids], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    finally:
        engine.shutdown()


def _config_of(argv: list[str]):
    args = build_parser().parse_args(argv)
    return args, build_engine_config(args.model_pos or args.model, **_engine_options(args))


def test_cli_vllm_aliases_parse_to_the_same_config(base):
    common = ["serve", str(base), "--device", "cpu", "--kv-cache-gb", "0.05"]
    vllm_args, vllm = _config_of(common + [
        "--lora-modules", "a=/ckpt/a", '{"name": "b", "path": "/ckpt/b"}', "--no-enable-prefix-caching",
        "--enforce-eager", "--seed", "5", "--api-key", "k1", "--max-model-len", "256",
        "--gpu-memory-utilization", "0.5", "--max-num-seqs", "7", "--max-num-batched-tokens", "64", "--dtype", "half",
        "--served-model-name", "m", "--tensor-parallel-size", "1", "--async-scheduling"])
    own_args, own = _config_of(common + [
        "--adapters", "a=/ckpt/a", "b=/ckpt/b", "--no-prefix-caching", "--seed", "5", "--api-keys", "k1",
        "--max-model-len", "256", "--gpu-memory-utilization", "0.5", "--max-num-seqs", "7",
        "--max-num-batched-tokens", "64", "--dtype", "float16", "--served-model-name", "m", "--async-scheduling"])
    own = build_engine_config(str(base), **{**_engine_options(own_args), "enable_cuda_graph": False})
    assert vllm == own
    assert (vllm.enable_cuda_graph, vllm.seed, vllm.cache.enable_prefix_caching) == (False, 5, False)
    assert vllm.scheduler.async_scheduling and not _config_of(common)[1].scheduler.async_scheduling
    assert (vllm_args.adapters, vllm_args.api_keys, vllm_args.served_model_name) == \
        (own_args.adapters, own_args.api_keys, own_args.served_model_name) == ([("a", "/ckpt/a"), ("b", "/ckpt/b")],
                                                                            "k1", "m")
    _, on = _config_of(common + ["--no-prefix-caching", "--enable-prefix-caching"])
    assert on.cache.enable_prefix_caching is True


@pytest.mark.parametrize("argv, message", [
    (["--tensor-parallel-size", "2"], "tensor_parallel_size=2 is not supported"),
    (["--quantization", "awq"], "quantization='awq' does not match the checkpoint"),
    (["--lora-modules", '{"name": "b"}'], "expected {\"name\": NAME, \"path\": PATH}"),
    (["--tool-call-parser", "pythonic"], "argument --tool-call-parser: invalid choice: 'pythonic'"),
])
def test_cli_refusals_name_the_option(base, argv, message, capsys):
    from lmq.cli import main

    try:
        code = main(["serve", str(base), "--device", "cpu", *argv])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    return capsys.readouterr().out


def test_help_shows_the_vllm_names(capsys):
    for command in ("serve", "generate", "chat"):
        text = _help(command, capsys)
        for flag in ("--tokenizer", "--chat-template", "--seed", "--enforce-eager", "--enable-prefix-caching",
                     "--no-enable-prefix-caching", "--max-model-len", "--gpu-memory-utilization", "--max-num-seqs",
                     "--max-num-batched-tokens", "--dtype", "--tensor-parallel-size", "--async-scheduling"):
            assert flag in text, (command, flag)
    serve = _help("serve", capsys)
    for flag in ("--lora-modules", "--api-key", "--served-model-name", "--host", "--port", "--enable-lora",
                 "--max-loras", "--max-lora-rank", "--tool-call-parser", "--enable-auto-tool-choice"):
        assert flag in serve, flag


def test_quantization_awq_accepted_on_an_awq_checkpoint(base, tmp_path):
    from quant_tools.awq import AWQConfig, quantize_checkpoint

    # round-to-nearest (no search): only the checkpoint's format matters here
    q = quantize_checkpoint(str(base), str(tmp_path / "awq"), AWQConfig(group_size=32, search=False,
                                                                       calib_samples=2, calib_seqlen=16),
                            [CORPUS[0] * 4] * 2)
    ids = random_prompts(1, [9], seed=11)
    checked = _llm(Path(q), quantization="awq").generate(ids, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert checked == _llm(Path(q)).generate(ids, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
