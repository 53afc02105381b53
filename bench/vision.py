"""Vision benchmarks on one GPU, on a random LLaVA model: a CLIP ViT-L/14-336-shaped tower
(24 layers, hidden 1024, 576 tokens per image, feature layer -2) over a Llama-3.2-1B-shaped
language model, bf16.

1. Image-encode throughput of the EncoderPool (one replica) at several batch sizes, against
   transformers' `LlavaModel.get_image_features` on the same weights and batches.
2. Time to first token of a burst of image requests while 64 text streams decode, with the
   pool encoding beside the decode steps ("overlap") and with the same encoder run inline on
   the engine thread ("inline", what an engine without a pool does), and the longest gap the
   text streams see between two decode steps while the burst is served.

    python bench/vision.py --tokenizer .gpu/tokenizer --json bench/results/vision_h200.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path

import _paths  # noqa: F401  (first: see its docstring)
import torch
from PIL import Image
from throughput import make_prompts
from tqdm.auto import tqdm

from lmq import LLM, SamplingParams
from lmq.multimodal import ProcessedImage
from lmq.weights import resolve_model


def make_random_llava(folder: Path, tokenizer_dir: str, device: str) -> Path:
    import transformers
    from transformers import AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.save_pretrained(folder)
    vision = transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                           num_attention_heads=16, image_size=336, patch_size=14,
                                           hidden_act="quick_gelu", projection_dim=768)
    text = transformers.LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                                    num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                                    max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5,
                                    bos_token_id=1, eos_token_id=2)
    cfg = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                      image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                      vision_feature_select_strategy="default")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 336},
                                    crop_size={"height": 336, "width": 336}).save_pretrained(folder)
    return folder


def random_images(n: int, seed: int) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    sizes = [(int(torch.randint(200, 800, (1,), generator=g)), int(torch.randint(200, 800, (1,), generator=g)))
             for _ in range(n)]
    return [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
            for w, h in sizes]


# -- 1. encode throughput -------------------------------------------------------------------------
def encode_throughput(llm: LLM, folder: str, batch_sizes: list[int], n_images: int) -> list[dict]:
    from transformers import LlavaForConditionalGeneration

    from vision.pool import EncoderPool

    images = llm.images.process(random_images(n_images, seed=1))
    encoder = llm.engine.encoders.replicas[0].encoder
    hf = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
    cfg = llm.engine.config
    rows = []
    for b in tqdm(batch_sizes, desc="encode throughput", unit="batch size"):
        pool = EncoderPool(cfg.model, ["cuda"], b, "cuda", encoders=[encoder])
        for _ in range(2):  # warm-up (kernel choice), untimed
            pool.submit(images[:b]).result()
        torch.cuda.synchronize()
        t = time.perf_counter()
        futures = [pool.submit([im]) for im in images]
        for f in futures:
            f.result()
        lmq_s = time.perf_counter() - t
        pool.close()
        # HF gets its batches already stacked on the host (lmq stacks per batch, from requests'
        # images); both copy them to the GPU inside the timed region, as a server must.
        stacked = torch.cat([im.pixel_values for im in images])  # [N, 3, S, S]
        with torch.no_grad():
            for _ in range(2):
                hf.model.get_image_features(stacked[:b].cuda().to(torch.bfloat16), vision_feature_layer=-2,
                                            vision_feature_select_strategy="default")
            torch.cuda.synchronize()
            t = time.perf_counter()
            for i in range(0, n_images, b):
                hf.model.get_image_features(stacked[i:i + b].cuda().to(torch.bfloat16), vision_feature_layer=-2,
                                            vision_feature_select_strategy="default")
            torch.cuda.synchronize()
        hf_s = time.perf_counter() - t
        rows.append({"batch_size": b, "lmq_images_per_s": n_images / lmq_s, "hf_images_per_s": n_images / hf_s,
                     "ratio": hf_s / lmq_s})
    del hf
    torch.cuda.empty_cache()
    return rows


# -- 2. TTFT of image requests beside 64 decoding streams -----------------------------------------
class InlinePool:
    """The engine's encoder run on the engine thread inside `submit`: no overlap."""

    def __init__(self, pool: object) -> None:
        self.pool = pool

    def submit(self, images: list[ProcessedImage]) -> Future:
        feats = self.pool.replicas[0].encoder.encode(images)
        torch.cuda.synchronize()
        f: Future = Future()
        f.set_result(feats)
        return f


def ttft_under_decode(llm: LLM, mode: str, n_text: int, n_images: int, seed: int) -> dict:
    engine = llm.engine
    real = engine.encoders
    if mode == "inline":
        engine.encoders = InlinePool(real)
    text_params = SamplingParams(max_tokens=384, temperature=0.0, ignore_eos=True)
    img_params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(make_prompts(n_text, 128, 32000, seed)):
        engine.add_request(f"{mode}-text-{i}", p, text_params, stream=True)
    step_times: list[float] = []
    for _ in range(40):  # every text stream is decoding after this
        engine.step()
        step_times.append(time.perf_counter())
    prompt = "USER: <image>\nDescribe the picture. ASSISTANT:"
    burst = [llm.images.from_prompt({"prompt": prompt, "multi_modal_data": {"image": im}})
             for im in random_images(n_images, seed=seed + 1)]
    before = [b - a for a, b in zip(step_times[-20:], step_times[-19:])]
    t0 = time.perf_counter()
    sent = time.monotonic()
    for k, (ids, images) in enumerate(burst):
        engine.add_request(f"{mode}-img-{k}", ids, img_params, images=images)
    first: dict[str, float] = {}
    gaps = [time.perf_counter() - step_times[-1]]
    while len(first) < n_images:
        last = time.perf_counter()
        for out in engine.step():
            if out.request_id.startswith(f"{mode}-img-") and out.finished:
                first[out.request_id] = out.first_token_time - sent
        gaps.append(time.perf_counter() - last)
    served_s = time.perf_counter() - t0
    for rid in list(engine.requests):
        engine.abort(rid)
    engine.encoders = real
    ttfts = sorted(first.values())
    return {"mode": mode, "text_streams": n_text, "images": n_images,
            "image_ttft_p50_ms": 1e3 * statistics.median(ttfts), "image_ttft_max_ms": 1e3 * ttfts[-1],
            "text_step_ms_before": 1e3 * statistics.median(before), "text_max_step_gap_ms": 1e3 * max(gaps),
            "burst_served_s": served_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the built-in model's)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--images", type=int, default=128, help="images encoded per throughput run")
    ap.add_argument("--burst", type=int, default=16, help="image requests sent at once beside the text streams")
    ap.add_argument("--text-streams", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/vision.py needs a CUDA GPU")
    tmp = Path(tempfile.mkdtemp(prefix="lmq-llava-"))
    folder = str(make_random_llava(tmp, args.tokenizer or resolve_model(None), "cuda"))
    llm = LLM(folder, device="cuda", dtype="bfloat16", gpu_memory_utilization=0.6, max_model_len=4096)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "encode": encode_throughput(llm, folder, args.batch_sizes,
                                                                             args.images)}
    ttft_under_decode(llm, "overlap", args.text_streams, 4, seed=5)  # warm-up: graphs, prefill shapes
    result["ttft"] = [ttft_under_decode(llm, mode, args.text_streams, args.burst, seed=10)
                      for mode in ("overlap", "inline")]
    print(f"\n{result['device']}: image encode (ViT-L/14-336, bf16), images/s")
    for r in result["encode"]:
        print(f"  batch {r['batch_size']:>3}: lmq {r['lmq_images_per_s']:8.1f}  HF {r['hf_images_per_s']:8.1f}  "
              f"{r['ratio']:.2f}x")
    print(f"{args.burst} image requests at once beside {args.text_streams} decoding text streams:")
    for r in result["ttft"]:
        print(f"  {r['mode']:>7}: image TTFT p50 {r['image_ttft_p50_ms']:7.1f} ms, "
              f"max {r['image_ttft_max_ms']:7.1f} ms; text step {r['text_step_ms_before']:.1f} ms before, "
              f"longest gap {r['text_max_step_gap_ms']:.1f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
