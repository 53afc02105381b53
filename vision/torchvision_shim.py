"""Make torchvision importable next to the CPU build of torch.

PyPI's only torchvision wheel is a CUDA build; imported next to CPU torch it fails with
"operator torchvision::nms does not exist", because its Python side registers fake kernels for
ops whose schemas its (unloadable) C++ library would have declared. timm and transformers' fast
image processors import torchvision, so lmq declares the two schemas it needs first. With CUDA
torch the library loads and declares them itself, and this does nothing.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


_libraries: list[torch.library.Library] = []  # a Library's definitions live as long as the object


@functools.cache
def ensure_torchvision() -> None:
    """Idempotent; call before anything imports torchvision (vision/__init__ does)."""
    if importlib.util.find_spec("torchvision") is None or torch.version.cuda is not None:
        return
    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        return  # declared already (torchvision was imported some other way)
    except RuntimeError:
        pass
    lib = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        lib.define(schema)
    _libraries.append(lib)
