"""CPU: every turbomind kernel instantiation compiles to an sm_90a cubin through the pip NVRTC."""

import pytest

from turbomind import compiler

DTYPES = ("float", "__half", "__nv_bfloat16")
NORM = tuple(f"rms_norm<{t}>" for t in DTYPES)
ACT = tuple(f"silu_and_mul<{t}>" for t in DTYPES)


def test_activation_compiles(tmp_path, monkeypatch):
    monkeypatch.setattr(compiler, "CACHE_DIR", tmp_path)
    cubin, lowered = compiler.compile_source((compiler.KERNELS / "activation.cu").read_text(), "activation.cu", ACT)
    for name in ACT:
        assert lowered[name].encode() in cubin


def test_norm_compiles(tmp_path, monkeypatch):
    monkeypatch.setattr(compiler, "CACHE_DIR", tmp_path)
    cubin, lowered = compiler.compile_source((compiler.KERNELS / "norm.cu").read_text(), "norm.cu", NORM)
    for name in NORM:
        assert lowered[name].encode() in cubin
    assert len(list(tmp_path.glob("*.cubin"))) == 1
    # a second compile is a disk-cache hit: NVRTC is never called
    monkeypatch.setattr(compiler.nvrtc, "createProgram", None)
    assert compiler.compile_source((compiler.KERNELS / "norm.cu").read_text(), "norm.cu", NORM) == (cubin, lowered)


def test_broken_source_raises_with_log(tmp_path, monkeypatch):
    monkeypatch.setattr(compiler, "CACHE_DIR", tmp_path)
    with pytest.raises(compiler.CompileError, match="undefined_thing"):
        compiler.compile_source("__global__ void k() { undefined_thing(); }", "broken.cu", ())
