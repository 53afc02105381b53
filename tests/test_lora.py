"""Multi-LoRA: every request of a batch mixing adapters and the base model gets exactly the
greedy tokens peft gives with that adapter alone (float32, CPU); slots, host tier, runtime
load/unload, the prefix cache and refusals of adapters lmq cannot serve."""

from __future__ import annotations

import json

import pytest
import torch
from lora_fixtures import ALL, SPECS, AdapterSpec, make_adapter, peft_greedy

from conftest import random_prompts
from lmq import LLM, SamplingParams
from lora.adapter import AdapterError

NEW = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
LENGTHS = [3, 17, 40, 70]


@pytest.fixture(scope="module")
def adapters(lora_adapters) -> dict[str, str]:
    return lora_adapters


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(10, LENGTHS, seed=40)


@pytest.fixture(scope="module")
def reference(tiny_models, adapters, prompts) -> dict[str | None, list[list[int]]]:
    """peft's tokens for every prompt under every adapter (and the base model)."""
    base = tiny_models["llama"]
    ref = {name: peft_greedy(base, path, prompts, NEW) for name, path in adapters.items()}
    ref[None] = peft_greedy(base, None, prompts, NEW)
    for name in adapters:  # every adapter really changes the output, so a dropped LoRA fails
        assert ref[name] != ref[None], f"adapter {name} does not change the greedy tokens"
    return ref


def _llm(tiny_models, **opts) -> LLM:
    return LLM(str(tiny_models["llama"]), device="cpu", dtype="float32", kv_cache_gb=0.05, **opts)


def _check_idle(llm: LLM) -> None:
    bm, am = llm.engine.block_manager, llm.engine.adapters
    bm.check_integrity()
    am.check_integrity()
    assert bm.num_free_blocks == bm.num_blocks
    assert not am.pins and all(a.num_requests == 0 for a in am.registry.values())


def _mixed(prompts: list[list[int]], names: list[str | None]) -> tuple[list[list[int]], list[str | None]]:
    """Every prompt under every name, interleaved so each step mixes adapters."""
    pairs = [(p, n) for p in prompts for n in names]
    return [p for p, _ in pairs], [n for _, n in pairs]


def _expected(reference, prompts, names) -> list[list[int]]:
    return [reference[n][i] for i in range(len(prompts)) for n in names]


def test_mixed_batch_matches_peft(tiny_models, adapters, prompts, reference):
    names = [None, *adapters]
    llm = _llm(tiny_models, adapters=adapters, max_loras=len(adapters))
    ps, ns = _mixed(prompts, names)
    outs = llm.generate(ps, GREEDY, adapter=ns)
    assert [o.outputs[0].token_ids for o in outs] == _expected(reference, prompts, names)
    _check_idle(llm)


def test_more_adapters_than_slots(tiny_models, adapters, prompts, reference):
    # 2 slots, 2 adapters in host memory, 4 adapters all requested at once, under chunked
    # prefill and KV preemption: adapters rotate through the slots and reload from disk.
    names = [None, *adapters]
    llm = _llm(tiny_models, adapters=adapters, max_loras=2, max_cpu_loras=2, max_num_batched_tokens=48,
               block_size=8, num_kv_blocks=48)
    ps, ns = _mixed(prompts, names)
    outs = llm.generate(ps, GREEDY, adapter=ns)
    assert [o.outputs[0].token_ids for o in outs] == _expected(reference, prompts, names)
    am = llm.engine.adapters
    assert am.num_slot_loads >= len(adapters) and am.num_reads >= 2  # slots reused, host misses re-read
    assert llm.engine.scheduler.num_preemptions > 0
    _check_idle(llm)


def test_slots_never_exceeded_in_a_step(tiny_models, adapters, prompts, reference):
    llm = _llm(tiny_models, adapters=adapters, max_loras=2, max_cpu_loras=4)
    eng, schedule, used = llm.engine, llm.engine.scheduler.schedule, []

    def watched():  # the engine's own schedule(), observed
        batch = schedule()
        uids = {s.seq.adapter.uid for s in batch.seqs if s.seq.adapter is not None}
        assert len({s.lora_slot for s in batch.seqs if s.lora_slot >= 0}) == len(uids)
        used.append(len(uids))
        return batch

    eng.scheduler.schedule = watched
    names = [list(adapters)[i % len(adapters)] for i in range(len(prompts))]
    outs = llm.generate(prompts, GREEDY, adapter=names)
    assert max(used) == 2
    assert [o.outputs[0].token_ids for o in outs] == [reference[n][i] for i, n in enumerate(names)]
    _check_idle(llm)


def test_runtime_load_and_unload(tiny_models, adapters, prompts, reference):
    llm = _llm(tiny_models, enable_lora=True)
    with pytest.raises(ValueError, match="'mlp16' is not loaded"):
        llm.generate(prompts[:1], GREEDY, adapter="mlp16")
    llm.load_adapter("mlp16", adapters["mlp16"])
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, adapter="mlp16")] == reference["mlp16"]
    with pytest.raises(ValueError, match="already loaded"):
        llm.load_adapter("mlp16", adapters["qv4"])
    llm.unload_adapter("mlp16")
    with pytest.raises(ValueError, match="'mlp16' is not loaded"):
        llm.generate(prompts[:1], GREEDY, adapter="mlp16")
    assert all(a is None for a in llm.engine.adapters.slots)
    # The name can be reused for other weights, which never see the old adapter's cached KV.
    llm.load_adapter("mlp16", adapters["qv4"])
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, adapter="mlp16")] == reference["qv4"]
    _check_idle(llm)


def test_unload_lets_running_requests_finish(tiny_models, adapters, prompts, reference):
    llm = _llm(tiny_models, adapters={"all8": adapters["all8"]})
    eng = llm.engine
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, GREEDY, adapter="all8")
    eng.step()
    eng.step()
    llm.unload_adapter("all8")
    with pytest.raises(ValueError, match="not loaded"):
        eng.add_request("late", prompts[0], GREEDY, adapter="all8")
    done = {}
    while eng.has_unfinished():
        for out in eng.step():
            done[out.request_id] = out.outputs[0].token_ids
    assert [done[f"r{i}"] for i in range(len(prompts))] == reference["all8"]
    assert all(a is None for a in eng.adapters.slots) and not eng.adapters.host
    _check_idle(llm)


def test_prefix_cache_is_per_adapter(tiny_models, adapters, reference, prompts):
    llm = _llm(tiny_models, adapters=adapters)
    long = prompts[3]  # 70 tokens: 4 full blocks of 16
    first = llm.generate([long], GREEDY, adapter="qv4")[0]
    assert first.num_cached_tokens == 0
    other = llm.generate([long], GREEDY, adapter="all8")[0]
    assert other.num_cached_tokens == 0  # same tokens, other adapter: nothing shared
    base = llm.generate([long], GREEDY)[0]
    assert base.num_cached_tokens == 0
    again = llm.generate([long], GREEDY, adapter="qv4")[0]
    assert again.num_cached_tokens == 64
    assert again.outputs[0].token_ids == first.outputs[0].token_ids == reference["qv4"][3]
    assert other.outputs[0].token_ids == reference["all8"][3]
    assert base.outputs[0].token_ids == reference[None][3]


def test_sampling_n_with_adapter(tiny_models, adapters, prompts):
    # n > 1 forks pin the parent's slot; seeded samples are reproducible per adapter.
    llm = _llm(tiny_models, adapters=adapters, max_loras=1)
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8)
    a = llm.generate(prompts[:4], params, adapter=["qv4", "qv4", "kd64", None])
    b = llm.generate(prompts[:4], params, adapter=["qv4", "qv4", "kd64", None])
    assert [[c.token_ids for c in o.outputs] for o in a] == [[c.token_ids for c in o.outputs] for o in b]
    _check_idle(llm)


def test_adapter_gone_from_disk_aborts_only_its_requests(tiny_models, adapters, prompts, reference, tmp_path):
    import shutil

    gone = shutil.copytree(adapters["all8"], tmp_path / "all8")
    # One host slot: loading qv4 second evicts all8's host copy, so all8 must be re-read.
    llm = _llm(tiny_models, adapters={"all8": str(gone), "qv4": adapters["qv4"]}, max_loras=1, max_cpu_loras=1)
    shutil.rmtree(gone)
    outs = llm.generate(prompts[:3], GREEDY, adapter=["qv4", "all8", None])
    assert outs[0].outputs[0].token_ids == reference["qv4"][0]
    assert outs[1].outputs[0].finish_reason == "abort"
    assert outs[2].outputs[0].token_ids == reference[None][2]
    assert "reloading adapter 'all8' failed" in llm.engine.adapters.registry["all8"].error
    _check_idle(llm)


# -- refusals ------------------------------------------------------------------------------------
def _edit_config(folder, **changes) -> None:
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("case,message", [
    ("dora", "use_dora=true is not supported"),
    ("bias", "bias='lora_only' is not supported"),
    ("modules_to_save", "modules_to_save"),
    ("lm_head", "unsupported adapter tensor"),
    ("rank", "rank 64 exceeds max_lora_rank=32"),
    ("shape", "do not fit the base model"),
    ("missing", "adapter_config.json is missing"),
    ("no_weights", "has no adapter_model.safetensors"),
])
def test_refused_adapters(tiny_models, adapters, tmp_path, case, message):
    import shutil

    folder = tmp_path / case
    base = tiny_models["llama"]
    if case == "dora":
        make_adapter(base, folder, SPECS["qv4"], 1, use_dora=True)
    elif case == "bias":
        shutil.copytree(adapters["qv4"], folder)
        _edit_config(folder, bias="lora_only")
    elif case == "modules_to_save":
        shutil.copytree(adapters["qv4"], folder)
        _edit_config(folder, modules_to_save=["lm_head"])
    elif case == "lm_head":
        make_adapter(base, folder, AdapterSpec(4, 8, ("q_proj", "lm_head")), 2)
    elif case == "rank":
        folder = adapters["kd64"]
    elif case == "shape":  # made for a model with another hidden size
        from conftest import make_model

        other = make_model(tmp_path / "wide", "llama", hidden_size=96, num_attention_heads=4)
        make_adapter(other, folder, AdapterSpec(4, 8, tuple(ALL)), 3)
    elif case == "missing":
        folder.mkdir()
    elif case == "no_weights":
        shutil.copytree(adapters["qv4"], folder)
        (folder / "adapter_model.safetensors").unlink()
    llm = _llm(tiny_models, enable_lora=True, max_lora_rank=32)
    with pytest.raises(AdapterError, match=message):
        llm.load_adapter("x", str(folder))
    assert "x" not in llm.engine.adapters.registry


def test_adapter_bin_format(tiny_models, adapters, prompts, reference, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "bin"
    folder.mkdir()
    src = adapters["qv4"]
    (folder / "adapter_config.json").write_text(open(f"{src}/adapter_config.json").read())
    torch.save(load_file(f"{src}/adapter_model.safetensors"), folder / "adapter_model.bin")
    llm = _llm(tiny_models, adapters={"qv4": str(folder)})
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, adapter="qv4")] == reference["qv4"]


def test_lora_needs_enabling(tiny_models, adapters, prompts):
    llm = _llm(tiny_models)
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        llm.load_adapter("qv4", adapters["qv4"])
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        llm.generate(prompts[:1], GREEDY, adapter="qv4")
