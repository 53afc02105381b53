"""lmq awq and AWQ checkpoints: AutoAWQ's packing code as the format reference, the quantizer and
AWQ's two searches, lmq's and AutoAWQ's checkpoints in lmq against transformers on the same
weights dequantized (float32, greedy tokens identical), multi-LoRA on an AWQ base against peft,
and the CLI's refusals (nothing half-written left behind)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from awq_fixtures import autoawq, autoawq_unpack, dense_folder
from lora_fixtures import SPECS, make_adapter, peft_greedy

from conftest import SEED, hf_greedy, make_model, random_prompts
from lmq import LLM, SamplingParams
from lmq.cli import main
from quant_tools import awq_format
from quant_tools.awq import LINEARS, AWQConfig, quantize_checkpoint, scale_groups
from quant_tools.quantizer import ScaleGroup, apply_scale, fake_quantize, quantize, search_clip, search_scale
from quant_tools.wikitext import split
from torch_engine.ops import awq_linear

GROUP = 32  # divides every dimension of the tiny models (64, 128, 4 x 16, 4 x 32)
NEW = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
SMALL = AWQConfig(group_size=GROUP, calib_samples=8, calib_seqlen=64)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + seed)


# -- the packed format ---------------------------------------------------------------------------
def test_pack_round_trip_and_autoawq_order():
    q = torch.randint(0, 16, (96, 64), generator=_gen(1), dtype=torch.int32)
    packed = awq_format.pack(q)  # [96, 8]
    assert packed.dtype == torch.int32 and packed.shape == (96, 8)
    assert torch.equal(awq_format.unpack(packed), q)
    pu = autoawq("awq.utils.packing_utils")  # AutoAWQ's own unpacking, then its un-interleaving
    iw, iz = pu.reverse_awq_order(*pu.unpack_awq(packed, packed[:4], 4), 4)
    assert torch.equal(iw & 0xF, q) and torch.equal(iz & 0xF, q[:4])
    # the layout spelled out: output columns 0..7 holding 0..7 sit in nibbles 0 2 4 6 1 3 5 7
    assert awq_format.pack(torch.arange(8, dtype=torch.int32)[None]).item() == 0x75316420


def test_packing_equals_autoawq_from_linear():
    """AutoAWQ's WQLinear_GEMM.from_linear packs the same integers bit for bit, and its forward
    (float16 on a CPU) agrees with lmq's awq_linear."""
    gemm = autoawq("awq.modules.linear.gemm")
    lin = torch.nn.Linear(128, 64, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(64, 128, generator=_gen(2)))
        lin.bias.copy_(torch.randn(64, generator=_gen(3)))
    gq = quantize(lin.weight, GROUP)
    lin.weight.data = fake_quantize(lin.weight.data, GROUP)  # AutoAWQ packs the dequantized weight
    ref = gemm.WQLinear_GEMM.from_linear(lin, 4, GROUP, scales=gq.scales.t().float(), zeros=gq.zeros.t())
    qweight, qzeros = awq_format.pack(gq.q.t().contiguous()), awq_format.pack(gq.zeros.t().contiguous())
    assert torch.equal(ref.qweight, qweight) and torch.equal(ref.qzeros, qzeros)
    assert torch.equal(ref.scales, gq.scales.t())
    x = torch.randn(5, 128, generator=_gen(4))
    ours = awq_linear(x.half(), qweight, qzeros, gq.scales.t().contiguous(), GROUP, lin.bias.half())
    torch.testing.assert_close(ours, ref(x.half()), rtol=2e-3, atol=2e-2)  # two fp16 matmul orders


# -- the quantizer and the searches --------------------------------------------------------------
def test_round_to_nearest_error_bound():
    # Row magnitudes over a decade: a row scaled near 0 would give float16-subnormal scales, whose
    # coarse rounding leaves part of the 0..15 range unused (true of AutoAWQ's fp16 scales too).
    w = torch.randn(48, 256, generator=_gen(5)) * (0.1 + 0.9 * torch.rand(48, 1, generator=_gen(6)))
    gq = quantize(w, GROUP)
    assert gq.q.min() >= 0 and gq.q.max() <= 15 and gq.scales.dtype == torch.float16
    err = (fake_quantize(w, GROUP) - w).abs().view(48, -1, GROUP)
    step = gq.scales.float()[..., None]
    # within half a step of the group's grid, but at the clamped ends (the zero point is rounded)
    assert (err <= step * 1.001).all() and (err <= step * 0.5 * 1.001 + 1e-7).float().mean() > 0.99
    assert (gq.q.view(48, -1, GROUP).amax(-1) - gq.q.view(48, -1, GROUP).amin(-1) >= 14).all()  # range used


def _tiny_layer(tiny_models: dict[str, Path], arch: str) -> tuple[torch.nn.Module, torch.Tensor, tuple]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
    x = torch.randn(3, 40, model.config.hidden_size, generator=_gen(7))
    rope = model.model.rotary_emb(x, torch.arange(40)[None])
    return model.model.layers[0], x, rope


@pytest.mark.parametrize("mha", [False, True])  # GQA: 3 groups; MHA with qkv bias: 4 (v -> o too)
def test_folded_scales_keep_the_function(tiny_models, tmp_path, mha):
    """Scales folded into the norms and linears before leave the layer's output unchanged."""
    from quant_tools.awq import _run_layer

    models = {"qwen2": make_model(tmp_path / "mha", "qwen2", num_key_value_heads=4)} if mha else tiny_models
    layer, x, rope = _tiny_layer(models, "qwen2" if mha else "llama")
    with torch.no_grad():
        before, inputs = _run_layer(layer, x, rope)
        groups = scale_groups(layer, inputs, rope, x.shape)
        for i, g in enumerate(groups):
            apply_scale(g, torch.rand(g.inputs.shape[1], generator=_gen(8 + i)) * 4 + 0.25)
        after, _ = _run_layer(layer, x, rope)
    assert len(groups) == (4 if mha else 3)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_scale_search_protects_outlier_channels():
    """Inputs with a few large channels (what AWQ is for): the searched scales cut the output
    error of round-to-nearest by more than half."""
    x = torch.randn(2048, 256, generator=_gen(9))
    x[:, torch.randperm(256, generator=_gen(10))[:4]] *= 30
    fc = torch.nn.Linear(256, 128, bias=False)
    with torch.no_grad():
        fc.weight.copy_(torch.randn(128, 256, generator=_gen(11)))
    norm = torch.nn.LayerNorm(256, elementwise_affine=True)
    group = ScaleGroup(norm, [fc], x, fc)
    ref = fc(x)
    with torch.no_grad():
        rtn = (x @ fake_quantize(fc.weight, GROUP).t() - ref).pow(2).mean()
        s = search_scale(group, GROUP)
        awq = (x @ (fake_quantize(fc.weight * s, GROUP) / s).t() - ref).pow(2).mean()
    assert awq < 0.5 * rtn, (awq.item(), rtn.item())


def _clip_elementwise(w: torch.Tensor, x: torch.Tensor, g: int) -> torch.Tensor:
    """AutoAWQ's formulation of the clip search (elementwise product, summed per group)."""
    n_groups = w.shape[1] // g
    xg = x.view(1, -1, n_groups, g)
    wg = w.view(w.shape[0], 1, n_groups, g)
    top = wg.abs().amax(-1, keepdim=True)
    ref = (xg * wg).sum(-1)
    best, best_err = top.clone(), torch.full_like(top, float("inf"))
    for i in range(10):
        lim = top * (1 - i / 20)
        q = fake_quantize(torch.clamp(wg, -lim, lim).reshape(w.shape[0], -1), g).view_as(wg)
        err = ((xg * q).sum(-1) - ref).pow(2).mean(1).view_as(top)
        better = err < best_err
        best_err[better], best[better] = err[better], lim[better]
    return best.view(w.shape[0], n_groups)


def test_clip_search_equals_autoawq_formulation_and_helps():
    w = torch.randn(72, 128, generator=_gen(12)).pow(3)  # heavy tails: clipping pays
    x = torch.randn(300, 128, generator=_gen(13))
    limit = search_clip(w, x, GROUP, n_tokens=300, rows_per_batch=40)
    torch.testing.assert_close(limit, _clip_elementwise(w, x, GROUP), rtol=1e-5, atol=1e-6)
    clipped = torch.maximum(torch.minimum(w.view(72, -1, GROUP), limit[..., None]), -limit[..., None]).view(72, 128)
    err_clip = (x @ fake_quantize(clipped, GROUP).t() - x @ w.t()).pow(2).mean()
    err_rtn = (x @ fake_quantize(w, GROUP).t() - x @ w.t()).pow(2).mean()
    assert err_clip < 0.99 * err_rtn and (limit < w.view(72, -1, GROUP).abs().amax(-1)).any()


# -- lmq's checkpoints in lmq and in transformers ------------------------------------------------
@pytest.fixture(scope="module")
def calibration() -> list[str]:
    return split(held_out=False)[:6]


@pytest.fixture(scope="module")
def quantized(tiny_models, calibration, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """arch -> (lmq's AWQ checkpoint, the same weights dequantized as a dense fp32 folder)."""
    root = tmp_path_factory.mktemp("awq")
    out = {}
    for arch in ("llama", "qwen2", "mistral", "qwen3"):
        q = quantize_checkpoint(str(tiny_models[arch]), str(root / arch), SMALL, calibration)
        out[arch] = (q, dense_folder(q, tiny_models[arch], root / f"{arch}-dense"))
    return out


def test_checkpoint_is_autoawq_gemm(quantized, tiny_models):
    from safetensors.torch import load_file
    from transformers import AwqConfig

    folder, _ = quantized["qwen2"]
    cfg = json.loads((folder / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc == {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm",
                  "modules_to_not_convert": None}
    read = AwqConfig.from_dict(qc).to_dict()  # transformers reads it as AutoAWQ GEMM
    assert (read["format"], read["bits"], read["group_size"], read["zero_point"]) == ("gemm", 4, GROUP, True)
    tensors = load_file(str(folder / "model.safetensors"))
    qkv = "model.layers.1.self_attn.k_proj"
    assert tensors[f"{qkv}.qweight"].shape == (64, 32 // 8) and tensors[f"{qkv}.qweight"].dtype == torch.int32
    assert tensors[f"{qkv}.qzeros"].shape == (64 // GROUP, 32 // 8)
    assert tensors[f"{qkv}.scales"].shape == (64 // GROUP, 32) and tensors[f"{qkv}.scales"].dtype == torch.float16
    assert tensors[f"{qkv}.bias"].dtype == torch.float16
    assert not any(n.endswith(f"{lin}.weight") for n in tensors for lin in LINEARS)
    assert (folder / "tokenizer.json").is_file() and not list(folder.parent.glob(".*partial*"))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3"])
def test_lmq_awq_matches_transformers_on_the_dequantized_weights(quantized, tiny_models, arch):
    from transformers import AutoModelForCausalLM

    folder, dense = quantized[arch]
    prompts = random_prompts(6, [1, 9, 40, 70], seed=20 + len(arch))
    llm = LLM(str(folder), device="cpu", dtype="float32", kv_cache_gb=0.05, max_num_batched_tokens=48)
    assert llm.engine.config.model.quant is not None
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    assert got == hf_greedy(dense, prompts, NEW)
    # and the quantization is real: at most 16 levels per (row, group), and not the original weights
    a = AutoModelForCausalLM.from_pretrained(dense).model.layers[0].mlp.down_proj.weight.detach()
    b = AutoModelForCausalLM.from_pretrained(tiny_models[arch]).model.layers[0].mlp.down_proj.weight.detach()
    groups = a.reshape(-1, GROUP)
    assert max(len(g.unique()) for g in groups) <= 16 and not torch.equal(a, b)


def test_multi_lora_on_an_awq_base_matches_peft(quantized, tiny_models, tmp_path):
    folder, dense = quantized["llama"]
    names = ("qv4", "all8")
    adapters = {n: str(make_adapter(tiny_models["llama"], tmp_path / n, SPECS[n], i)) for i, n in enumerate(names)}
    prompts = random_prompts(4, [5, 30, 60], seed=30)
    ref = {n: peft_greedy(dense, adapters.get(n) if n else None, prompts, NEW) for n in (None, *names)}
    assert ref["qv4"] != ref[None] and ref["all8"] != ref[None]
    llm = LLM(str(folder), device="cpu", dtype="float32", kv_cache_gb=0.05, adapters=adapters, max_loras=2)
    ps = [p for p in prompts for _ in (None, *names)]
    ns = [n for _ in prompts for n in (None, *names)]
    outs = llm.generate(ps, GREEDY, adapter=ns)
    assert [o.outputs[0].token_ids for o in outs] == [ref[n][i] for i in range(len(prompts)) for n in (None, *names)]


# -- AutoAWQ's checkpoints in lmq ----------------------------------------------------------------
@pytest.mark.parametrize("legacy", [False, True])
def test_autoawq_checkpoint_loads(tiny_models, tmp_path, legacy):
    """A checkpoint packed by AutoAWQ's WQLinear_GEMM (its config in the transformers form, or
    the older w_bit / q_group_size / "GEMM" form) generates what transformers generates on the
    dequantized weights."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    gemm = autoawq("awq.modules.linear.gemm")
    base = tiny_models["qwen2"]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            gq = quantize(module.weight.data, GROUP)
            module.weight.data = fake_quantize(module.weight.data, GROUP)
            packed = gemm.WQLinear_GEMM.from_linear(module, 4, GROUP, scales=gq.scales.t().float(),
                                                    zeros=gq.zeros.t())
            for kind in ("qweight", "qzeros", "scales", "bias"):
                if getattr(packed, kind, None) is not None:
                    tensors[f"{name}.{kind}"] = getattr(packed, kind).contiguous()
    quantized = {k.rsplit(".", 1)[0] for k in tensors}
    for name, p in model.state_dict().items():
        if name.rsplit(".", 1)[0] not in quantized:
            tensors[name] = p.half().contiguous()
    folder = tmp_path / "autoawq"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = ({"quant_method": "awq", "zero_point": True, "q_group_size": GROUP, "w_bit": 4,
                                   "version": "GEMM"} if legacy else
                                  {"quant_method": "awq", "zero_point": True, "group_size": GROUP, "bits": 4,
                                   "version": "gemm", "modules_to_not_convert": None})
    (folder / "config.json").write_text(json.dumps(cfg))
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, folder / f.name)
    prompts = random_prompts(4, [3, 25, 50], seed=31)
    got = LLM(str(folder), device="cpu", dtype="float32", kv_cache_gb=0.05).generate(prompts, GREEDY)
    dense = dense_folder(folder, base, tmp_path / "dense")
    assert [o.outputs[0].token_ids for o in got] == hf_greedy(dense, prompts, NEW)
    # the exact dequantization equals the weights AutoAWQ packed
    k = "model.layers.0.mlp.up_proj"
    torch.testing.assert_close(autoawq_unpack(tensors[f"{k}.qweight"], tensors[f"{k}.qzeros"], tensors[f"{k}.scales"],
                                              GROUP), model.get_submodule(k).weight.data, rtol=0, atol=1e-6)


def test_refuses_unsupported_quantization(tiny_models, tmp_path):
    folder = tmp_path / "gptq"
    shutil.copytree(tiny_models["llama"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quant_method='gptq' is not supported"):
        LLM(str(folder), device="cpu", kv_cache_gb=0.05)
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 48, "version": "gemm"}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="group_size.*48.*divisor of hidden_size=64"):
        LLM(str(folder), device="cpu", kv_cache_gb=0.05)


# -- the CLI -------------------------------------------------------------------------------------
def _awq_cli(capsys, *args: str) -> tuple[int, str]:
    rc = main(["awq", *args])
    return rc, capsys.readouterr().err


def test_cli_quantizes(tiny_models, tmp_path, capsys):
    docs = tmp_path / "calib.jsonl"
    docs.write_text("\n".join(json.dumps({"text": t}) for t in split(held_out=False)[:3]) + "\n")
    out = tmp_path / "q"
    rc, err = _awq_cli(capsys, str(tiny_models["mistral"]), str(out), "--calib-data", str(docs), "--calib-samples",
                       "4", "--calib-seqlen", "32", "--group-size", "64", "--no-clip", "--device", "cpu")
    assert rc == 0, err
    assert f"wrote {out}" in err
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 64
    assert LLM(str(out), device="cpu", kv_cache_gb=0.05).generate([[5, 6, 7]], GREEDY)[0].outputs[0].token_ids


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if "partial" in p.name)


def test_cli_refusals(tiny_models, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    llama = str(tiny_models["llama"])
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=384)).save_pretrained(gpt2)
    binary, empty, bad_jsonl = tmp_path / "calib.bin", tmp_path / "empty.txt", tmp_path / "bad.jsonl"
    binary.write_bytes(bytes(range(256)) * 4)
    empty.write_text("\n\n  \n")
    bad_jsonl.write_text('{"text": "fine"}\n{"txt": 3}\n')
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    g32 = ["--group-size", "32"]
    cases = [
        ([str(gpt2), "o1"], "architecture 'GPT2LMHeadModel' is not supported"),
        ([llama, "o2", "--group-size", "48"], "--group-size 48 does not divide hidden_size=64: use one of [32, 64]"),
        ([llama, "o3", "--calib-data", str(tmp_path / "missing.txt")], "missing.txt: cannot be read"),
        ([llama, "o4", "--calib-data", str(binary)], "cannot be read as UTF-8 text"),
        ([llama, "o5", "--calib-data", str(empty)], "no text in it"),
        ([llama, "o6", "--calib-data", str(bad_jsonl)], "line 2: expected an object with a string field 'text'"),
        ([llama, str(full), *g32], "already exists and is not an empty folder"),
        ([llama, "o7", "--w-bits", "3"], "--w-bits 3 is not supported"),
        ([llama, "o8", "--calib-samples", "0"], "--calib-samples 0 is invalid"),
        ([llama, "o9", "--device", "nope"], "--device 'nope' is not a device"),
        ([llama, "o10", "--device", "cuda:7", *g32], "--device cuda:7: no such CUDA device here"),
    ]
    for args, message in cases:
        out = Path(args[1]) if args[1] == str(full) else tmp_path / args[1]
        rc, err = _awq_cli(capsys, args[0], str(out), *args[2:])
        assert rc == 2 and message in err, (args, err)
        assert out == full or not out.exists()
    assert (full / "keep.txt").read_text() == "mine" and _leftovers(tmp_path) == []


def test_failure_midway_leaves_nothing(tiny_models, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["llama"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated: fails while loading
    out = tmp_path / "out"
    with pytest.raises(Exception):  # noqa: B017  (whatever safetensors raises: the point is what is left)
        main(["awq", str(broken), str(out), "--group-size", "32", "--calib-samples", "2", "--calib-seqlen", "16"])
    assert not out.exists() and _leftovers(tmp_path) == []


def test_default_calibration_text_is_real_prose():
    calib, held_out = split(held_out=False), split(held_out=True)
    assert len(calib) > 50 and len(held_out) > 15 and not set(calib) & set(held_out)
    text = "\n".join(calib)
    assert len(text) > 1_000_000 and text.count("{{") < 20 and text.count("[[") < 5
    words = text.split()
    assert sum(w.lower() in {"the", "of", "and", "in"} for w in words) > 0.08 * len(words)  # English prose
