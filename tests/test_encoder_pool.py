"""EncoderPool on CPU replicas and on one GPU (two replicas on its own streams): least-loaded
dispatch by queued patches, batches capped at max_batch_size, results equal to the encoder's
own, and encoding that overlaps decode steps."""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image
from transformers import AutoConfig

from conftest import SEED, wait_for
from lmq import LLM, SamplingParams
from lmq.models import model_config_from_hf
from lmq.multimodal import ProcessedImage
from vision.encoder import VisionEncoder, load_encoder
from vision.pool import EncoderPool
from vlm_fixtures import make_llava


class Gated:
    """An encoder that waits for `gate` before each batch and records the batch sizes (images)."""

    def __init__(self, inner: VisionEncoder) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.started = threading.Event()
        self.batches: list[int] = []

    def encode(self, images: list[ProcessedImage]) -> list[torch.Tensor]:
        self.started.set()
        assert self.gate.wait(30), "the test never opened the gate"
        self.batches.append(len(images))
        return self.inner.encode(images)


def image(pixels: torch.Tensor, num_tokens: int) -> ProcessedImage:
    return ProcessedImage(pixels[None], tuple(pixels.shape[1:]), num_tokens, content_hash=-1)


@pytest.fixture(scope="module")
def clip_llava(tmp_path_factory):
    return make_llava(tmp_path_factory.mktemp("pool") / "clip", "clip", seed=7)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
def test_dispatch_goes_to_the_least_loaded_replica_in_capped_batches(clip_llava, device):
    cfg = model_config_from_hf(str(clip_llava), AutoConfig.from_pretrained(clip_llava), "float32", device)
    plain = load_encoder(cfg, device)
    gated = [Gated(load_encoder(cfg, device)) for _ in range(2)]
    pool = EncoderPool(cfg, [device, device], max_batch_size=2, out_device=device, encoders=gated)
    per = cfg.vision.patches_per_tile
    g = torch.Generator().manual_seed(SEED)
    jobs = [[image(torch.randn(3, 30, 30, generator=g), cfg.vision.tokens_per_tile) for _ in range(k)]
            for k in (3, 1, 1, 2)]
    try:
        futures = [pool.submit(jobs[0])]
        assert gated[0].started.wait(30)  # replica 0 holds job 0's first batch
        assert pool.queued_patches() == [3 * per, 0]
        futures += [pool.submit(j) for j in jobs[1:]]
        # job 1 -> replica 1 (0 < 3); job 2 -> replica 1 (1 < 3); job 3 -> replica 1 (2 < 3)
        assert pool.queued_patches() == [3 * per, 4 * per]
        for enc in gated:
            enc.gate.set()
        results = [f.result(timeout=30) for f in futures]
    finally:
        pool.close()
    assert pool.queued_patches() == [0, 0]
    for images, feats in zip(jobs, results):
        torch.testing.assert_close(torch.stack(feats), torch.stack(plain.encode(images)), atol=1e-4, rtol=1e-4)
    assert gated[0].batches == [2, 1]  # job 0's three images, at most two at a time
    # jobs 1-3 (four images): how they group depends on when the worker wakes, never over the cap
    assert max(gated[1].batches) <= 2 and sum(gated[1].batches) == 4
    assert [r.images_encoded for r in pool.replicas] == [3, 4]


@pytest.mark.parametrize("device", DEVICES)
def test_decode_steps_go_on_while_images_encode(clip_llava, device):
    llm = LLM(str(clip_llava), dtype="float32", num_kv_blocks=64, device=device)
    engine = llm.engine
    replica = engine.encoders.replicas[0]
    gated = Gated(replica.encoder)
    replica.encoder = gated
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    engine.add_request("text", "USER: a text request ASSISTANT:", params)
    image = Image.new("RGB", (20, 30), (10, 200, 30))
    prompt, images = llm.images.from_prompt({"prompt": "USER: <image> ASSISTANT:",
                                             "multi_modal_data": {"image": image}})
    engine.add_request("image", prompt, params, images=images)
    assert gated.started.wait(30)
    done = {}
    while "text" not in done:  # the text request runs to its end while the image is held in the encoder
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    assert len(done["text"].outputs[0].token_ids) == 8
    assert "image" in engine.encoding and engine.scheduler.running == []
    gated.gate.set()
    wait_for(lambda: (done.update((o.request_id, o) for o in engine.step() if o.finished), "image" in done)[1],
             "the image request finished after its encoding")
    assert len(done["image"].outputs[0].token_ids) == 8
