"""Images -> the pixel tensors a checkpoint's tower expects, exactly as its image processor config
(preprocessor_config.json) says: transformers' own processor for that config (CLIP: resize the
shortest edge, center crop; SigLIP: resize to a fixed size; then rescale and normalize) does it."""

from __future__ import annotations

import hashlib

import torch
from PIL import Image

from lmq.config import VisionConfig
from lmq.multimodal import ProcessedImage


def content_hash(pixel_values: torch.Tensor) -> int:
    """A negative 63-bit id of the pixels, so a prefix-cache key over image positions can never
    equal one over real token ids (which are >= 0)."""
    digest = hashlib.sha256(pixel_values.contiguous().view(torch.uint8).numpy().tobytes()).digest()
    return -1 - (int.from_bytes(digest[:8], "little") >> 1)


class ImagePreprocessor:
    """Thread-safe for concurrent calls (transformers' processors keep no per-call state)."""

    def __init__(self, path: str, vision: VisionConfig) -> None:
        from transformers import AutoImageProcessor

        try:
            self.hf = AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} has no usable image processor config (preprocessor_config.json): {e}") from None
        self.vision = vision

    def __call__(self, images: list[Image.Image]) -> list[ProcessedImage]:
        if not images:
            return []
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        pixels = self.hf(images=rgb, return_tensors="pt")["pixel_values"].float()  # [N, 3, S, S]
        size = self.vision.image_size
        if tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"the image processor config makes {tuple(pixels.shape[1:])} pixels, but the vision "
                             f"tower takes (3, {size}, {size}): the checkpoint's two configs disagree")
        return [ProcessedImage(p, content_hash(p)) for p in pixels]
