"""lora.slot_image: an adapter packed into one [rank, W] image and written into a slot through
the staging buffer leaves every stack exactly as writing each module's A and B^T into a
cleared slot does (LoRAStack.set, which test_lora_ops checks against per-token formulas), also
over a slot that held an adapter of higher rank and other targets; the layout's column ranges
tile the image with no gap or overlap.
"""

from __future__ import annotations

import torch

from lmq import LLM
from lora.adapter import PROJECTIONS
from lora.slot_image import FUSED, SlotLayout


def _llm(tiny_models, dtype: str) -> LLM:
    return LLM(str(tiny_models["llama"]), device="cpu", dtype=dtype, enable_lora=True, max_loras=3,
               max_lora_rank=64)


def test_layout_tiles_the_image(tiny_models):
    cfg = _llm(tiny_models, "float32").engine.config.model
    layout = SlotLayout.for_model(cfg)
    cols = [c for (layer, name) in [(i, n) for i in range(cfg.num_layers) for n in PROJECTIONS]
            for c in layout.module_cols(layer, name)]
    covered = sorted((c.start, c.stop) for c in cols)
    assert covered[0][0] == 0 and covered[-1][1] == layout.width
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))  # contiguous, no overlap
    assert [(s.layer, s.fused) for s in layout.spans] == [(i, f) for i in range(cfg.num_layers) for f in FUSED]


def test_packed_write_equals_module_writes(tiny_models, lora_adapters):
    for dtype in ("float32", "bfloat16"):
        llm = _llm(tiny_models, dtype)
        manager, model = llm.engine.adapters, llm.engine.runner.model
        stacks = [lin.lora for layer in model.layers for lin in layer.projections().values()]
        # kd64 (rank 64, k and down) first, then qv4 (rank 4, q and v) over it in the same slot
        for name in ("kd64", "qv4", "all8", "mlp16"):
            weights = manager.read(lora_adapters[name])
            llm.engine.runner.load_lora_slot(1, manager.pack(weights))
            ref = {id(s): (torch.zeros_like(s.a), torch.zeros_like(s.b)) for s in stacks}
            for (i, mod), m in weights.modules.items():
                fused, part = PROJECTIONS[mod]
                stack = model.layers[i].projections()[fused].lora
                a, b = ref[id(stack)]
                a[:m.rank, 1, part] = m.a.to(a.dtype)
                lo = stack.offsets[part]
                b[:m.rank, 1, part, lo:lo + stack.parts[part]] = m.bt.to(b.dtype)
            for s in stacks:
                a, b = ref[id(s)]
                assert torch.equal(s.a[:, 1], a[:, 1]) and torch.equal(s.b[:, 1], b[:, 1]), (name, dtype)
                assert not s.a[:, [0, 2]].any() and not s.b[:, [0, 2]].any()  # other slots untouched
        llm.engine.runner.load_lora_slot(1, None)
        assert not any(s.a.any() or s.b.any() for s in stacks)
