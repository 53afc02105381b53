"""Runs one step's StepInput through the model: builds the attention metadata from it, owns the
KV cache, and replays CUDA graphs for decode-only steps on a GPU. Never reads a Sequence.
The ops module it is given (torch_engine.ops, turbomind.ops) decides which kernels run."""

from __future__ import annotations

import logging
from types import ModuleType

import torch

from lmq.block_manager import blocks_for
from lmq.config import EngineConfig, ModelConfig
from lmq.models import ARCHITECTURES
from lmq.sampling import SamplingParams
from lmq.scheduler import ScheduledBatch, ScheduledSeq
from lmq.sequence import Request, Sequence
from lmq.step_builder import StepBuilder
from lmq.step_input import ModelOutput, StepInput
from lmq.weights import iterate_weights, part_weights
from lora.ops import LoRAMetadata
from lora.slot_image import SlotImage
from torch_engine.attention_metadata import AttentionMetadata
from torch_engine.cuda_graph import DecodeGraphs

log = logging.getLogger("lmq")


def load_model(cfg: ModelConfig, ops: ModuleType, device: str) -> torch.nn.Module:
    """Build the model directly on `device`, each tensor in its own dtype (torch's default dtype
    is neither read nor changed), and fill it from the checkpoint."""
    with torch.device(device):
        model = ARCHITECTURES[cfg.architecture](cfg, ops)
    model.load_weights(part_weights(cfg.path, "language_model") if cfg.vision else iterate_weights(cfg.path))
    return model.eval()


class ModelRunner:
    def __init__(self, config: EngineConfig, ops: ModuleType) -> None:
        self.config = config
        self.ops = ops  # torch_engine.ops or turbomind.ops: the same interface
        self.sample_race = getattr(ops, "sample_race", None)  # turbomind's one-kernel draw
        self.argmax = getattr(ops, "argmax_rows", None)  # and its greedy argmax (in the decode graphs)
        self.device = torch.device(config.device)
        self.block_size = config.cache.block_size
        self.model = load_model(config.model, ops, config.device)
        if config.lora is not None:  # before profiling: the stacks' memory is not KV cache
            self.model.enable_lora(config.lora)
            self.slot_ids = torch.arange(config.lora.max_loras, device=self.device)  # [S]
        self.kv_caches: torch.Tensor | None = None
        self.scratch_block = 0  # the cache's last block, set with the cache
        self.graphs: DecodeGraphs | None = None

    def load_lora_slot(self, slot: int, image: SlotImage | None) -> None:
        self.model.load_lora_slot(slot, image)

    def lora_rank_bucket(self, rank: int) -> int:
        """Ranks computed for a step: a power of two >= the step's largest rank, at most the
        configured maximum (fewer distinct shapes, so fewer CUDA graphs). Zero columns add 0."""
        if rank == 0:
            return 0
        return min(1 << (rank - 1).bit_length(), self.config.lora.max_lora_rank)

    def lora_onehot(self, slots: torch.Tensor) -> torch.Tensor:
        """slots: [T] int64 (-1 = base) -> [T, S] in the model dtype; a base row is all zero."""
        return (slots[:, None] == self.slot_ids[None, :]).to(self.config.model.dtype)

    # -- KV cache ------------------------------------------------------------------------------
    def block_bytes(self) -> int:
        return self.config.model.kv_bytes_per_token * self.block_size

    def profile_num_blocks(self) -> int:
        """Blocks that fit: free GPU memory after a peak-size forward, or the CPU byte budget."""
        cache = self.config.cache
        if self.device.type != "cuda":
            return max(int(cache.kv_cache_gb * 2**30) // self.block_bytes(), 1)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._profile_forward()
        free, total = torch.cuda.mem_get_info(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        non_torch = total - free - torch.cuda.memory_reserved(self.device)
        # Headroom for sampling (sort/softmax over [max_num_seqs, vocab] float32 rows) and graphs.
        sampler = 4 * self.config.scheduler.max_num_seqs * self.config.model.vocab_size * 4
        available = total * cache.gpu_memory_utilization - peak - non_torch - sampler
        return max(int(available) // self.block_bytes(), 1)

    def _profile_forward(self) -> None:
        """One step at the token budget, as prompts of at most max_model_len tokens each, built
        by a builder of its own (the engine's block table never sees the profiling cache)."""
        budget, max_len = self.config.scheduler.max_num_batched_tokens, self.config.model.max_model_len
        lens = [max_len] * (budget // max_len) + ([budget % max_len] if budget % max_len else [])
        blocks_per_seq = blocks_for(max(lens), self.block_size)
        self._allocate(blocks_per_seq * len(lens))
        scheduled = []
        for i, n in enumerate(lens):
            seq = Sequence(-1 - i, Request("profile", None, [0] * n, SamplingParams()), 0, [0] * n, n)
            table = list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))
            scheduled.append(ScheduledSeq(seq, 0, n, table))
        builder = StepBuilder(len(lens), blocks_per_seq, self.block_size, self.device)
        self.execute(builder.build(ScheduledBatch(scheduled)).step)
        self.kv_caches = None
        torch.cuda.synchronize(self.device)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """The cache, then (on CUDA) the decode graphs over it (`DecodeGraphs.capture_all`)."""
        self._allocate(num_blocks)
        if self.device.type == "cuda" and self.config.enable_cuda_graph:
            self.graphs = DecodeGraphs(self, self.config.scheduler.max_num_seqs,
                                       blocks_for(self.config.model.max_model_len, self.block_size))
            self.graphs.capture_all()

    def _allocate(self, num_blocks: int) -> None:
        """[L, 2, num_blocks + 1, block_size, Hkv, D]; the extra last block is scratch space that
        padded rows of a CUDA graph write to."""
        m = self.config.model
        self.kv_caches = None  # (the profiling cache goes first)
        self.kv_caches = torch.zeros(m.num_layers, 2, num_blocks + 1, self.block_size, m.num_kv_heads,
                                     m.head_dim, dtype=m.dtype, device=self.device)
        self.scratch_block = num_blocks

    # -- one step ------------------------------------------------------------------------------
    def _replays(self, step: StepInput) -> bool:
        return self.graphs is not None and step.decode_only and step.images is None

    def fuses_sampling(self, step: StepInput) -> bool:
        """A replayed decode step whose every sequence samples one row, in order, draws inside
        its graph (torch_engine.cuda_graph)."""
        return self._replays(step) and step.num_logit_rows == step.num_sample_rows == step.num_seqs

    @torch.inference_mode()
    def execute(self, step: StepInput) -> ModelOutput:
        if self._replays(step):
            if step.sampling is not None and not self.fuses_sampling(step):
                raise ValueError("StepInput.sampling on a step whose rows are not one per sequence")
            return self.graphs.run(step)
        meta = AttentionMetadata.from_step(step, self.block_size)
        with self.ops.attention_backends(self.device):
            hidden = self.model(step.token_ids, step.positions, self.kv_caches, meta, self.lora_metadata(step),
                                step.images)  # [T, hidden]
        if step.num_logit_rows:
            logits = self.model.compute_logits(hidden.index_select(0, step.logit_rows))  # [Ns + Np, V]
        else:
            logits = hidden.new_zeros(0, 1).float()
        return ModelOutput(logits[:step.num_sample_rows], logits[step.num_sample_rows:])

    def lora_metadata(self, step: StepInput) -> LoRAMetadata | None:
        """Eager steps compute only the adapter tokens' rows (all of them: no index needed)."""
        lora = step.lora
        if lora is None:
            return None
        slots = lora.token_slots if lora.adapter_rows is None else lora.token_slots.index_select(0, lora.adapter_rows)
        return LoRAMetadata(self.lora_rank_bucket(lora.rank), self.lora_onehot(slots), lora.adapter_rows, slots)
