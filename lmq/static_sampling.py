"""The sampler's draw as fixed-shape tensor ops, for a runner to run inside a captured decode step.

`Sampler.launch` decides on the host which rows draw and which filters run, so its launches
change with the batch; a CUDA graph replays fixed work. Here every row runs the same ops,
with its parameters as device tensors (`StepSampling.params`), and the host's decisions
shrink to a `SamplingMode`: a runner keeps one graph per mode. The masks and the race are
row-wise, so running them over rows that do not need them changes no token: given the same
keys, `sample_static` equals `Sampler.launch` row for row (tests/test_static_sampling.py).

`Sampler.step_sampling` builds a `StepSampling` only for steps whose draws need nothing but the
logits: no penalties, logit bias, allowed or banned tokens, grammars or explicit generators.
Logprobs are read from the same logits afterwards (`Sampler.finish`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lmq.sampling import Race, counter_race, mask_logits
from lmq.step_input import StepSampling, greedy_row


def greedy_params(rows: int, vocab: int, device: torch.device) -> torch.Tensor:
    """[rows, 4] params of greedy rows (a CUDA graph's padded rows)."""
    return torch.tensor(greedy_row(vocab), device=device).repeat(rows, 1)


def sample_static(logits: torch.Tensor, sampling: StepSampling, race: Race | None,
                  argmax: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """logits [B, V] float32 -> tokens [B] int64: greedy rows' argmax (`argmax`: the backend's
    op, equal to torch.argmax's; None: torch's), the others' race over their temperature-scaled,
    filtered logits (`race`: the backend's one-kernel draw; None: `counter_race`). No host work
    depends on the values, so a CUDA graph can hold it."""
    tokens = argmax(logits) if argmax is not None else logits.argmax(-1)  # [B]
    mode = sampling.mode
    if not mode.random:
        return tokens
    temperature, top_p, min_p, top_k = sampling.params.unbind(1)  # [B] each
    greedy = temperature == 0
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    scaled = mask_logits(scaled, top_k if mode.top else None, top_p if mode.top else None,
                         min_p if mode.min_p else None)
    drawn = (race or counter_race)(scaled, sampling.keys)
    return torch.where(greedy, tokens, drawn)
