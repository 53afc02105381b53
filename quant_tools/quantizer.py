"""Group-wise 4-bit quantization and the two searches of AWQ (Lin et al., 2023), on one
transformers decoder layer at a time.

Round-to-nearest with a zero point, per group of `g` input channels of each output row:

    s = (max - min) / 15 (stored as float16),  z = clamp(round(-min / s), 0, 15)
    q = clamp(round(w / s) + z, 0, 15),        w ~ (q - z) * s

AWQ keeps the weights that meet large activations precise by scaling input channels before
rounding: for a group of linears reading the same input X (q|k|v after the input norm, gate|up
after the post-attention norm, o after v, down after up), it searches alpha over a grid for

    s = mean|X|^alpha / mean(|W| / group max)^(1 - alpha),  normalized to geometric mean 1
    minimizing || block(X; Q(W * s) / s) - block(X; W) ||^2

and folds 1/s into the op before (the norm's weight, or the rows of the linear before), so the
network computes the same function with W * s in place of W. Then, per group of each linear
(q and k excepted: their error passes through the q.k product), it searches how far to clip
the weights' range: max|w| * (1 - i / 20) for i < 10, minimizing the error of the group's
share of the output on sampled inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

MAX_Q = 15  # 4 bits


@dataclass(frozen=True)
class GroupQuant:
    """One linear's quantization: W ~ (q - z) * s."""

    q: torch.Tensor  # [out, in] int32 in [0, 15]
    zeros: torch.Tensor  # [out, in / g] int32
    scales: torch.Tensor  # [out, in / g] float16


def quantize(w: torch.Tensor, group_size: int) -> GroupQuant:
    """w: [out, in] -> its round-to-nearest quantization (scales rounded to float16 first, so
    that the stored scales are the ones the integers were computed with)."""
    out_f, in_f = w.shape
    g = w.float().reshape(out_f, in_f // group_size, group_size)
    hi, lo = g.amax(-1, keepdim=True), g.amin(-1, keepdim=True)
    s = ((hi - lo).clamp(min=1e-5) / MAX_Q).half().float()
    z = (-torch.round(lo / s)).clamp(0, MAX_Q)
    q = (torch.round(g / s) + z).clamp(0, MAX_Q)
    return GroupQuant(q.reshape(out_f, in_f).int(), z.squeeze(-1).int(), s.squeeze(-1).half())


def fake_quantize(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """w after quantizing and dequantizing, in w's dtype."""
    gq = quantize(w, group_size)
    z = gq.zeros.repeat_interleave(group_size, dim=1)
    s = gq.scales.float().repeat_interleave(group_size, dim=1)
    return ((gq.q - z) * s).to(w.dtype)


@dataclass
class ScaleGroup:
    """Linears that read one input, the op whose output that input is, and what to measure."""

    prev: nn.Module  # a norm (weight [in]) or a linear (its last `in` output rows are scaled)
    linears: list[nn.Linear]
    inputs: torch.Tensor  # [N, in]: the linears' input on the calibration tokens
    block: Callable[[torch.Tensor], torch.Tensor]  # the module whose output the loss compares


@torch.no_grad()
def search_scale(group: ScaleGroup, group_size: int, n_grid: int = 20, loss_tokens: int | None = None) -> torch.Tensor:
    """The best per-input-channel scales s [in] (float32) of the grid search: the activation
    statistics over every input row, the loss over the first `loss_tokens` (None: all; whole
    sequences, as the block may be an attention)."""
    x = group.inputs
    weight = torch.cat([fc.weight for fc in group.linears]).float()  # [sum out, in]
    wg = weight.abs().view(-1, group_size)
    w_mean = (wg / (wg.amax(dim=1, keepdim=True) + 1e-6)).view(weight.shape).mean(0)  # [in]
    x_mean = x.abs().float().mean(0)  # [in]
    x = x[:loss_tokens]
    reference = group.block(x).float()
    originals = [fc.weight.clone() for fc in group.linears]
    best, best_loss = None, float("inf")
    for i in range(n_grid):
        alpha = i / n_grid
        s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        s[~torch.isfinite(s)] = 1
        for fc, w in zip(group.linears, originals):
            fc.weight.copy_((fake_quantize(w.float() * s, group_size) / s).to(w.dtype))
        loss = (group.block(x).float() - reference).pow(2).mean().item()
        if loss < best_loss:
            best, best_loss = s.clone(), loss
    for fc, w in zip(group.linears, originals):
        fc.weight.copy_(w)
    if best is None:
        raise ValueError("AWQ's scale search found no finite loss: the calibration activations overflow")
    return best


@torch.no_grad()
def apply_scale(group: ScaleGroup, s: torch.Tensor) -> None:
    """Fold 1/s into the op before and s into the linears: the same function, with the linears'
    input channels scaled by s (their recorded inputs are divided by s to stay true)."""
    prev = group.prev
    if isinstance(prev, nn.Linear):
        n = s.numel()
        prev.weight[-n:].div_(s.view(-1, 1).to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias[-n:].div_(s.to(prev.bias.dtype))
    else:  # an RMSNorm: y = weight * normalized(x)
        prev.weight.div_(s.to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    for fc in group.linears:
        fc.weight.mul_(s.view(1, -1).to(fc.weight.dtype))
    group.inputs = group.inputs / s.to(group.inputs.dtype)


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, group_size: int, n_grid: int = 20, max_shrink: float = 0.5,
                n_tokens: int = 512, rows_per_batch: int = 1024) -> torch.Tensor:
    """The best clipping range per (output row, group): max |w| [out, in / g], float32.

    w: [out, in]; x: [N, in] the linear's input (every (N / n_tokens)-th token is used). Each
    group's share of the output is a batched matmul over the groups (AutoAWQ multiplies
    elementwise and sums, which on a CPU costs ~50x more for the same numbers)."""
    out_f, in_f = w.shape
    n_groups = in_f // group_size
    x = x[:: max(1, x.shape[0] // n_tokens)].float()
    xg = x.view(-1, n_groups, group_size).transpose(0, 1)  # [G, n, g]
    best_all = []
    for r in range(0, out_f, rows_per_batch):
        wb = w[r:r + rows_per_batch].float()  # [b, in]
        b = wb.shape[0]

        def shares(m: torch.Tensor) -> torch.Tensor:  # [b, in] -> [G, n, b]: x_G @ m_G^T per group
            return torch.bmm(xg, m.view(-1, n_groups, group_size).permute(1, 2, 0))

        reference = shares(wb)
        top = wb.view(b, n_groups, group_size).abs().amax(-1)  # [b, G]
        best, best_err = top.clone(), torch.full_like(top, float("inf"))
        for i in range(int(max_shrink * n_grid)):
            limit = top * (1 - i / n_grid)  # [b, G]
            lim = limit[..., None]
            clipped = torch.maximum(torch.minimum(wb.view(b, n_groups, group_size), lim), -lim).view(b, in_f)
            err = (shares(fake_quantize(clipped, group_size)) - reference).pow(2).mean(1).t()  # [b, G]
            better = err < best_err
            best_err[better], best[better] = err[better], limit[better]
        best_all.append(best)
    return torch.cat(best_all)


@torch.no_grad()
def apply_clip(fc: nn.Linear, limit: torch.Tensor, group_size: int) -> None:
    """Clamp each (row, group) of fc's weight to [-limit, limit]; limit: [out, in / g]."""
    w = fc.weight.view(fc.weight.shape[0], -1, group_size)
    lim = limit[..., None].to(w.dtype)
    w.copy_(torch.clamp(w, -lim, lim))
