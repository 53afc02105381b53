"""CPU: every turbomind kernel instantiation the launchers use compiles to an sm_90a cubin
through the pip NVRTC (turbomind.launch.INSTANTIATIONS), and compiles are cached on disk."""

import pytest

from turbomind import compiler
from turbomind.launch import INSTANTIATIONS


def test_every_kernel_file_is_listed():
    assert sorted(INSTANTIATIONS) == sorted(p.name for p in compiler.KERNELS.glob("*.cu"))


@pytest.mark.parametrize("file", sorted(INSTANTIATIONS))
def test_kernels_compile(file, tmp_path, monkeypatch):
    monkeypatch.setattr(compiler, "CACHE_DIR", tmp_path)
    names = INSTANTIATIONS[file]
    cubin, lowered = compiler.compile_source((compiler.KERNELS / file).read_text(), file, names,
                                             include=compiler.headers())
    assert sorted(lowered) == sorted(names)
    for name in names:
        assert lowered[name].encode() in cubin, name


def test_second_compile_is_a_disk_cache_hit(tmp_path, monkeypatch):
    monkeypatch.setattr(compiler, "CACHE_DIR", tmp_path)
    names = INSTANTIATIONS["norm.cu"]
    first = compiler.compile_source((compiler.KERNELS / "norm.cu").read_text(), "norm.cu", names)
    assert len(list(tmp_path.glob("*.cubin"))) == 1
    monkeypatch.setattr(compiler.nvrtc, "createProgram", None)  # NVRTC is never called again
    assert compiler.compile_source((compiler.KERNELS / "norm.cu").read_text(), "norm.cu", names) == first


def test_broken_source_raises_with_log(tmp_path, monkeypatch):
    monkeypatch.setattr(compiler, "CACHE_DIR", tmp_path)
    with pytest.raises(compiler.CompileError, match="undefined_thing"):
        compiler.compile_source("__global__ void k() { undefined_thing(); }", "broken.cu", ())


def test_a_changed_header_recompiles(tmp_path, monkeypatch):
    """A kernel's cache key covers the headers it may include: editing one compiles again."""
    monkeypatch.setattr(compiler, "CACHE_DIR", tmp_path)
    source = '#include "k.cuh"\nextern "C" __global__ void k(float* y) { *y = VALUE; }'
    compiler.compile_source(source, "k.cu", (), include={"k.cuh": "#define VALUE 1.f"})
    compiler.compile_source(source, "k.cu", (), include={"k.cuh": "#define VALUE 1.f"})
    assert len(list(tmp_path.glob("*.cubin"))) == 1
    compiler.compile_source(source, "k.cu", (), include={"k.cuh": "#define VALUE 2.f"})
    assert len(list(tmp_path.glob("*.cubin"))) == 2
