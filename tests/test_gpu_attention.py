"""Eager attention on CUDA takes the memory-efficient SDPA kernel, never cuDNN or the math
fallback: `torch_engine.ops.attention` on mixed decode + prefill steps (the masks, GQA, sliding
windows, shuffled block tables of tests/test_ops.py) run with only EFFICIENT_ATTENTION allowed,
which raises if a call needs another backend, against the same float64 reference."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from test_ops import ATTN_CASES, DTYPES, _mixed, _run
from torch_engine import ops

pytestmark = pytest.mark.gpu  # without CUDA, conftest refuses a run of only these, else skips them

# (block_size, H, Hkv, D, window) of the shapes lmq serves: Llama-3.2-1B-like (32 / 8 / 64) and
# Llama-3-8B-like (32 / 8 / 128), block size 16, with and without a window.
MODEL_CASES = [(16, 32, 8, 64, None), (16, 32, 8, 128, None), (16, 32, 8, 128, 40)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("block_size", "h", "hkv", "d", "window"), ATTN_CASES + MODEL_CASES)
def test_attention_runs_on_the_efficient_kernel_alone(dtype, block_size, h, hkv, d, window):
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        _run(_mixed(block_size), block_size=block_size, h=h, hkv=hkv, d=d, window=window, dtype=dtype,
             seed=300 + block_size + d + (window or 0), device="cuda")


def test_cudnn_is_not_among_the_engines_backends():
    """What the runner enters around each forward pass and graph capture."""
    assert SDPBackend.CUDNN_ATTENTION not in ops.CUDA_SDPA_BACKENDS
    assert ops.CUDA_SDPA_BACKENDS.index(SDPBackend.EFFICIENT_ATTENTION) < ops.CUDA_SDPA_BACKENDS.index(SDPBackend.MATH)
    with ops.attention_backends(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
