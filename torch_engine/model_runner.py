"""Runs one scheduled step through the model: builds the flat token batch and its attention
metadata, owns the KV cache, and replays CUDA graphs for decode-only steps on a GPU."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import torch

from lmq.attention import AttentionMetadata
from lmq.block_manager import blocks_for
from lmq.config import EngineConfig, ModelConfig
from lmq.models import ARCHITECTURES
from lmq.multimodal import ImageEmbeds, chunk_image_rows
from lmq.sampling import SamplingParams
from lmq.scheduler import ScheduledBatch, ScheduledSeq
from lmq.sequence import Request, Sequence
from lmq.transfer import to_device
from lmq.weights import iterate_weights, part_weights
from lora.adapter import LoRAAdapter
from lora.ops import LoRAMetadata
from torch_engine.cuda_graph import DecodeGraphs
from torch_engine.ops import attention_backends

log = logging.getLogger("lmq")


@dataclass
class ModelOutput:
    sample_logits: torch.Tensor  # [Ns, V] float32: one row per scheduled seq that samples, in batch order
    prompt_logits: dict[int, torch.Tensor]  # seq_id -> [n, V]: rows predicting the next prompt token


@dataclass
class ModelInput:
    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    order: list[ScheduledSeq]  # decodes first, then prefills: the flat layout
    offsets: list[int]  # start of each entry of `order` in the flat layout
    lora: LoRAMetadata | None = None  # None: no adapter token in the step
    lora_slots: torch.Tensor | None = None  # [T] int64 slot of each token, -1 = base model
    images: ImageEmbeds | None = None  # None: no image position in the step


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(cfg: ModelConfig, ops: ModuleType, device: str) -> torch.nn.Module:
    """Build the model directly on `device` in its dtype and fill it from the checkpoint."""
    with torch.device(device), _default_dtype(cfg.dtype):
        model = ARCHITECTURES[cfg.architecture](cfg, ops)
    model.load_weights(part_weights(cfg.path, "language_model") if cfg.vision else iterate_weights(cfg.path))
    return model.to(cfg.dtype).eval()


def _num_prompt_rows(s: ScheduledSeq) -> int:
    """Rows of the chunk whose logits predict a prompt token (positions < P - 1), for prompt_logprobs."""
    if s.seq.params.prompt_logprobs is None:
        return 0
    return max(min(s.start + s.num_new_tokens, s.seq.num_prompt_tokens - 1) - s.start, 0)


class ModelRunner:
    def __init__(self, config: EngineConfig, ops: ModuleType) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.block_size = config.cache.block_size
        self.model = load_model(config.model, ops, config.device)
        if config.lora is not None:  # before profiling: the stacks' memory is not KV cache
            self.model.enable_lora(config.lora)
            self.slot_ids = torch.arange(config.lora.max_loras, device=self.device)  # [S]
        self.kv_caches: torch.Tensor | None = None
        self.scratch_block = 0  # the cache's last block, set with the cache
        self.graphs: DecodeGraphs | None = None

    def load_lora_slot(self, slot: int, adapter: LoRAAdapter | None) -> None:
        self.model.load_lora_slot(slot, adapter)

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
        """One step at the token budget, as prompts of at most max_model_len tokens each."""
        budget, max_len = self.config.scheduler.max_num_batched_tokens, self.config.model.max_model_len
        lens = [max_len] * (budget // max_len) + ([budget % max_len] if budget % max_len else [])
        blocks_per_seq = blocks_for(max(lens), self.block_size)
        self._allocate(blocks_per_seq * len(lens))
        scheduled = []
        for i, n in enumerate(lens):
            seq = Sequence(-1 - i, Request("profile", None, [0] * n, SamplingParams()), 0, [0] * n, n)
            table = list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))
            scheduled.append(ScheduledSeq(seq, 0, n, table))
        self.execute(ScheduledBatch(scheduled))
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
    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> ModelOutput:
        inp = self.prepare(batch)
        decode_only = inp.meta.num_prefill_seqs == 0
        # Prompt rows are looked for here only when a graph could run; _logits finds them otherwise.
        if self.graphs is not None and decode_only and inp.images is None and \
                not any(_num_prompt_rows(s) for s in inp.order):
            logits = self.graphs.run(inp)  # [Bd, V]; all decodes, so `order` is the batch order
            rows = [i for i, s in enumerate(inp.order) if s.samples]
            if len(rows) < len(inp.order):
                logits = logits[to_device(rows, logits.device)]
            return ModelOutput(logits, {})
        with attention_backends(self.device):
            hidden = self.model(inp.token_ids, inp.positions, self.kv_caches, inp.meta, inp.lora,
                                inp.images)  # [T, hidden]
        return self._logits(batch, inp, hidden)

    def _logits(self, batch: ScheduledBatch, inp: ModelInput, hidden: torch.Tensor) -> ModelOutput:
        where = {id(s): off for s, off in zip(inp.order, inp.offsets)}
        sample_rows = [where[id(s)] + s.num_new_tokens - 1 for s in batch.seqs if s.samples]
        prompt_rows: dict[int, list[int]] = {}
        for s, off in zip(inp.order, inp.offsets):
            if n := _num_prompt_rows(s):
                prompt_rows[s.seq.seq_id] = list(range(off, off + n))
        rows = sample_rows + [r for rs in prompt_rows.values() for r in rs]
        if rows:  # (a list index would make the host wait here for the forward pass)
            logits = self.model.compute_logits(hidden[to_device(rows, hidden.device)])
        else:
            logits = hidden.new_zeros(0, 1).float()
        out, k = {}, len(sample_rows)
        for seq_id, rs in prompt_rows.items():
            out[seq_id] = logits[k:k + len(rs)]
            k += len(rs)
        return ModelOutput(logits[:len(sample_rows)], out)

    def prepare(self, batch: ScheduledBatch) -> ModelInput:
        bs = self.block_size
        decodes = [s for s in batch.seqs if s.num_new_tokens == 1]
        prefills = [s for s in batch.seqs if s.num_new_tokens > 1]
        order = decodes + prefills
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        offsets: list[int] = []
        for s in order:
            offsets.append(len(ids))
            p = range(s.start, s.start + s.num_new_tokens)
            ids.extend(s.seq.token_ids[s.start:s.start + s.num_new_tokens])
            pos.extend(p)
            slots.extend(s.block_table[i // bs] * bs + i % bs for i in p)
        max_q = max((s.num_new_tokens for s in prefills), default=0)
        pad_index, query_pos, unpad = [], [], []
        for i, s in enumerate(prefills):
            off = offsets[len(decodes) + i] - len(decodes)
            js = [min(j, s.num_new_tokens - 1) for j in range(max_q)]
            pad_index.append([off + j for j in js])
            query_pos.append([s.start + j for j in js])
            unpad.extend(i * max_q + j for j in range(s.num_new_tokens))

        dt, pt = self._block_tables(decodes), self._block_tables(prefills)
        tok_slots, lora_rows = self._lora_rows(order, batch.lora_rank)
        img_rows, img_feats = self._image_rows(order, offsets)
        # One host-to-device copy for all of the step's index arrays (each copy has a fixed cost).
        slots_t, dctx, pad_t, qpos, unpad_t, dt_t, pt_t, ids_t, pos_t, tok_slots_t, rows_t, img_t = self._to_device([
            (slots, (-1,)), ([s.start + 1 for s in decodes], (-1,)),
            ([x for row in pad_index for x in row], (len(prefills), max_q)),
            ([x for row in query_pos for x in row], (len(prefills), max_q)), (unpad, (-1,)),
            dt, pt, (ids, (-1,)), (pos, (-1,)), (tok_slots, (-1,)), (lora_rows, (-1,)), (img_rows, (-1,))])
        images = ImageEmbeds(img_t, torch.cat(img_feats)) if img_feats else None
        meta = AttentionMetadata(
            slot_mapping=slots_t,
            num_decode_tokens=len(decodes),
            decode_block_tables=dt_t,
            decode_context_lens=dctx,
            prefill_block_tables=pt_t,
            prefill_pad_index=pad_t,
            prefill_query_pos=qpos,
            prefill_unpad_index=unpad_t,
        )
        if not tok_slots:
            return ModelInput(ids_t, pos_t, meta, order, offsets, images=images)
        # Eager steps compute only the adapter tokens' rows (all of them: no index needed).
        every = len(lora_rows) == len(tok_slots)
        lora = LoRAMetadata(self.lora_rank_bucket(batch.lora_rank),
                            self.lora_onehot(tok_slots_t if every else tok_slots_t[rows_t]),
                            None if every else rows_t)
        return ModelInput(ids_t, pos_t, meta, order, offsets, lora, tok_slots_t, images)

    @staticmethod
    def _image_rows(order: list[ScheduledSeq], offsets: list[int]) -> tuple[list[int], list[torch.Tensor]]:
        """Flat rows of the step's image positions and their feature rows ([M] and pieces of [M, hidden]);
        a chunk that stops inside an image takes the features of the positions it covers."""
        rows: list[int] = []
        feats: list[torch.Tensor] = []
        for s, off in zip(order, offsets):
            req = s.seq.request
            if not req.images or s.start >= req.images[-1].end:
                continue
            for i, first, n in chunk_image_rows(s.start, s.num_new_tokens, req.images):
                row = off + req.images[i].offset + first - s.start
                rows.extend(range(row, row + n))
                feats.append(req.image_features[i][first:first + n])
        return rows, feats

    @staticmethod
    def _lora_rows(order: list[ScheduledSeq], rank: int) -> tuple[list[int], list[int]]:
        """Each token's slot in the flat layout and the rows of adapter tokens ([], [] when the
        step has none)."""
        if not rank:
            return [], []
        tok_slots = [s.lora_slot for s in order for _ in range(s.num_new_tokens)]
        return tok_slots, [i for i, slot in enumerate(tok_slots) if slot >= 0]

    def _to_device(self, arrays: list[tuple[list[int], tuple[int, ...]]]) -> list[torch.Tensor]:
        """Flat int lists with their shapes -> int64 tensors on the device, in one copy."""
        flat = [x for a, _ in arrays for x in a]
        packed = to_device(flat, self.device)
        out, k = [], 0
        for a, shape in arrays:
            out.append(packed[k:k + len(a)].view(shape))
            k += len(a)
        return out

    def _block_tables(self, seqs: list[ScheduledSeq]) -> tuple[list[int], tuple[int, int]]:
        """Flat [B, nb] rows padded with the scratch block; nb covers each seq's positions up to this step."""
        bs = self.block_size
        nb = max((blocks_for(s.start + s.num_new_tokens, bs) for s in seqs), default=0)
        pad = self.scratch_block
        flat: list[int] = []
        for s in seqs:
            row = s.block_table[:nb]
            flat.extend(row)
            flat.extend([pad] * (nb - len(row)))
        return flat, (len(seqs), nb)
