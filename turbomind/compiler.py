"""NVRTC compilation of turbomind/kernels/*.cu to cubins, cached in memory and on disk.

The cache key is the sha256 of source + the headers it may include (kernels/*.cuh, given to
NVRTC by name) + options + arch + NVRTC version, so a restart compiles nothing and any change
recompiles. Works on a CPU machine (CI compile-checks every kernel).
"""

from __future__ import annotations

import functools
import hashlib
import os
import site
import tempfile
from pathlib import Path

from cupy_backends.cuda.libs import nvrtc  # cupy 14's home of the NVRTC bindings

KERNELS = Path(__file__).parent / "kernels"
CACHE_DIR = Path(os.environ.get("LMQ_CACHE", Path.home() / ".cache" / "lmq")) / "turbomind"


class CompileError(RuntimeError):
    """NVRTC refused a source; the message holds NVRTC's log."""


def include_dirs() -> list[str]:
    """The CUDA headers (cuda_bf16.h, ...) and their cccl/: the pip wheels' <site>/nvidia/cu13/include
    first, else a CUDA toolkit's ($CUDA_PATH, $CUDA_HOME, /usr/local/cuda)."""
    roots = [Path(r) / "nvidia" / "cu13" for r in site.getsitepackages() + [site.getusersitepackages()]]
    roots += [Path(p) for p in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda") if p]
    for root in roots:
        inc = root / "include"
        if (inc / "cuda_bf16.h").is_file():
            return [str(inc)] + ([str(inc / "cccl")] if (inc / "cccl").is_dir() else [])
    raise CompileError("CUDA headers not found: install nvidia-cuda-runtime==13.0.* and nvidia-cuda-cccl==13.0.*")


def _options(arch: str) -> list[str]:
    return [f"--gpu-architecture={arch}", "-std=c++17", "--use_fast_math"] + [f"-I{d}" for d in include_dirs()]


def headers() -> dict[str, str]:
    """kernels/*.cuh by name: the headers a kernel file may #include."""
    return {p.name: p.read_text() for p in sorted(KERNELS.glob("*.cuh"))}


def compile_source(source: str, name: str, names: tuple[str, ...], arch: str = "sm_90a",
                   include: dict[str, str] | None = None) -> tuple[bytes, dict[str, str]]:
    """source -> (cubin, {name expression: lowered name}). `names` are template instantiations;
    `include`: header name -> text, for its #include \"name\" lines."""
    include = include or {}
    opts = _options(arch)
    parts = [source, *(f"{k}\0{v}" for k, v in sorted(include.items())), *opts, *names, arch, str(nvrtc.getVersion())]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    path = CACHE_DIR / f"{key}.cubin"
    lowered_path = path.with_suffix(".names")
    if path.exists() and lowered_path.exists():
        lowered = dict(line.split("\t") for line in lowered_path.read_text().splitlines())
        return path.read_bytes(), lowered
    prog = nvrtc.createProgram(source, name, [v.encode() for v in include.values()], [k.encode() for k in include])
    try:
        for n in names:
            nvrtc.addNameExpression(prog, n)
        try:
            nvrtc.compileProgram(prog, opts)
        except nvrtc.NVRTCError as e:
            raise CompileError(f"{name}: {e}\n{nvrtc.getProgramLog(prog)}") from e
        cubin = nvrtc.getCUBIN(prog)
        lowered = {n: nvrtc.getLoweredName(prog, n) for n in names}
    finally:
        nvrtc.destroyProgram(prog)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    for p, data in ((path, cubin), (lowered_path, "\n".join(f"{k}\t{v}" for k, v in lowered.items()).encode())):
        fd, tmp = tempfile.mkstemp(dir=CACHE_DIR)  # written atomically: rename over the final name
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    return cubin, lowered


@functools.cache
def compile_kernel_file(file: str, names: tuple[str, ...], arch: str = "sm_90a") -> tuple[bytes, dict[str, str]]:
    """turbomind/kernels/<file> -> (cubin, lowered names), cached in memory too."""
    return compile_source((KERNELS / file).read_text(), file, names, arch, headers())
