"""EncoderPool: one VisionEncoder replica per device, each on a worker thread, load-balanced.

    engine thread                          replica 0 (cuda:0)      replica 1 (cuda:1) ...
    submit(request's images) ─► the replica with the fewest queued patches
                                           worker: take queued images up to max_batch_size
                                           (all their tiles in one tower batch), encode on its
                                           own CUDA stream, move the features to the LLM's
                                           device, complete each request's Future
    each step: collect the done Futures (never waits while other work can run)

torch kernels release the GIL, so a replica encodes while the engine thread keeps launching
decode steps: a burst of images does not stall the streams already running. A request's images
may be split over several batches of one replica; a batch may mix images of several requests.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from lmq.config import ModelConfig
from lmq.multimodal import ProcessedImage

log = logging.getLogger("lmq")


@dataclass(eq=False)
class _Job:
    images: list[ProcessedImage]
    future: Future  # -> list of [num_tokens, hidden] on the output device, one per image
    patches: int  # cost used for balancing: the images' tiles x patches per tile
    taken: int = 0  # images handed to a batch so far
    results: list[torch.Tensor | None] = field(default_factory=list)


class _Replica:
    def __init__(self, encoder: torch.nn.Module, device: torch.device) -> None:
        self.encoder = encoder
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.jobs: deque[_Job] = deque()
        self.queued_patches = 0
        self.images_encoded = 0
        self.batches = 0


class EncoderPool:
    def __init__(self, model: ModelConfig, devices: list[str], max_batch_size: int, out_device: str,
                 encoders: list[torch.nn.Module] | None = None) -> None:
        """encoders: prebuilt replicas, one per device (tests); else each is loaded from `model`."""
        from vision.encoder import load_encoder

        if not devices:
            raise ValueError("vision_devices is empty: at least one device is needed")
        if max_batch_size < 1:
            raise ValueError(f"vision_max_batch_size={max_batch_size} is invalid: must be >= 1")
        self.model = model
        self.max_batch_size = max_batch_size
        self.out_device = torch.device(out_device)
        encoders = encoders or [load_encoder(model, d) for d in devices]
        self.replicas = [_Replica(enc, torch.device(d)) for enc, d in zip(encoders, devices)]
        self._patches_per_tile = model.vision.patches_per_tile
        self._cond = threading.Condition()
        self._closed = False
        self.fail_batches = 0  # test-only (DebugHooks.fail_encodes): the next batches raise
        self._threads = [threading.Thread(target=self._work, args=(r,), name=f"lmq-vision-{r.device}", daemon=True)
                         for r in self.replicas]
        for t in self._threads:
            t.start()
        log.info("lmq: vision encoder on %s, batches of up to %d images", ", ".join(devices), max_batch_size)

    def _patches(self, images: list[ProcessedImage]) -> int:
        return sum(im.pixel_values.shape[0] for im in images) * self._patches_per_tile

    def submit(self, images: list[ProcessedImage]) -> Future:
        """Queue one request's images on the least-loaded replica; the Future gives their features."""
        job = _Job(list(images), Future(), self._patches(images), results=[None] * len(images))
        with self._cond:
            if self._closed:
                raise RuntimeError("the encoder pool is closed")
            replica = min(self.replicas, key=lambda r: r.queued_patches)
            replica.jobs.append(job)
            replica.queued_patches += job.patches
            self._cond.notify_all()
        return job.future

    def queued_patches(self) -> list[int]:
        with self._cond:
            return [r.queued_patches for r in self.replicas]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=10)

    # -- workers -------------------------------------------------------------------------------
    def _next_batch(self, r: _Replica) -> list[tuple[_Job, int]] | None:
        """Up to max_batch_size (job, image index) pairs from the replica's queue, oldest first."""
        with self._cond:
            while not r.jobs and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            batch: list[tuple[_Job, int]] = []
            for job in r.jobs:
                while job.taken < len(job.images) and len(batch) < self.max_batch_size:
                    batch.append((job, job.taken))
                    job.taken += 1
                if len(batch) == self.max_batch_size:
                    break
            while r.jobs and r.jobs[0].taken == len(r.jobs[0].images):
                r.jobs.popleft()
            return batch

    def _work(self, r: _Replica) -> None:
        while (batch := self._next_batch(r)) is not None:
            images = [job.images[i] for job, i in batch]
            try:
                feats = self._encode(r, images)
            except Exception as e:  # one bad batch fails its requests, never the pool
                log.exception("lmq: vision encoder failed on %s", r.device)
                feats, error = None, e
            with self._cond:
                r.queued_patches -= self._patches(images)
                r.images_encoded += len(batch)
                r.batches += 1
            for k, (job, i) in enumerate(batch):
                if job.future.done():
                    continue
                if feats is None:
                    job.future.set_exception(error)
                    continue
                job.results[i] = feats[k]
                if all(x is not None for x in job.results):
                    job.future.set_result(job.results)

    def _encode(self, r: _Replica, images: list[ProcessedImage]) -> list[torch.Tensor]:
        """Images, on the replica's stream -> [num_tokens, hidden] each on the output device, ready."""
        with self._cond:
            if self.fail_batches > 0:
                self.fail_batches -= 1
                raise RuntimeError("injected encoder failure (DebugHooks.fail_encodes)")
        if r.stream is None:
            return [f.to(self.out_device) for f in r.encoder.encode(images)]
        with torch.cuda.stream(r.stream):
            feats = [f.to(self.out_device, non_blocking=True) for f in r.encoder.encode(images)]
            if self.out_device.type == "cuda":  # the engine reads them on that device's default stream
                for f in feats:
                    f.record_stream(torch.cuda.default_stream(self.out_device))
        r.stream.synchronize()
        return feats
