"""Images -> the pixel tensors a checkpoint's tower expects, exactly as its image processor config
(preprocessor_config.json) says: transformers' own processor for that config does it (CLIP:
resize the shortest edge, center crop; SigLIP: resize to a fixed size; LLaVA-NeXT: also the
any-resolution tiles, see vision.anyres; then rescale and normalize)."""

from __future__ import annotations

import hashlib

import torch
from PIL import Image

from lmq.config import VisionConfig
from lmq.multimodal import ProcessedImage
from vision import anyres


def content_hash(pixel_values: torch.Tensor, image_size: tuple[int, int]) -> int:
    """A negative 63-bit id of the pixels (and the original size, which LLaVA-NeXT's unpadding
    reads), so a prefix-cache key over image positions can never equal one over real token ids
    (which are >= 0)."""
    h = hashlib.sha256(pixel_values.contiguous().view(torch.uint8).numpy().tobytes())
    h.update(repr(image_size).encode())
    return -1 - (int.from_bytes(h.digest()[:8], "little") >> 1)


class ImagePreprocessor:
    """Thread-safe for concurrent calls (transformers' processors keep no per-call state)."""

    def __init__(self, path: str, vision: VisionConfig) -> None:
        from transformers import AutoImageProcessor

        try:
            self.hf = AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} has no usable image processor config (preprocessor_config.json): {e}") from None
        self.vision = vision
        if vision.anyres:  # the tiles the processor cuts must be the ones the model packs
            ours = [list(p) for p in vision.grid_pinpoints]
            theirs = [list(p) for p in getattr(self.hf, "image_grid_pinpoints", None) or []]
            if ours != theirs:
                raise ValueError(f"{path}: preprocessor_config.json has image_grid_pinpoints={theirs}, but config.json "
                                 f"has {ours}: the checkpoint's two configs disagree")

    def __call__(self, images: list[Image.Image]) -> list[ProcessedImage]:
        if not images:
            return []
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        out = self.hf(images=rgb, return_tensors="pt")
        # LLaVA: [N, 3, S, S]; LLaVA-NeXT: [N, most tiles of any image, 3, S, S] (zero-padded) + image_sizes
        pixels = out["pixel_values"].float()
        size = self.vision.image_size
        if tuple(pixels.shape[-3:]) != (3, size, size):
            raise ValueError(f"the image processor config makes {tuple(pixels.shape[-3:])} pixels, but the vision "
                             f"tower takes (3, {size}, {size}): the checkpoint's two configs disagree")
        result = []
        for i, im in enumerate(rgb):
            hw = (im.height, im.width)
            if self.vision.anyres:
                hw = tuple(int(x) for x in out["image_sizes"][i])
                tiles = pixels[i, :anyres.num_tiles(self.vision, hw)].contiguous()
                n = anyres.num_tokens(self.vision, hw)
            else:
                tiles, n = pixels[i][None], self.vision.tokens_per_tile
            result.append(ProcessedImage(tiles, hw, n, content_hash(tiles, hw)))
        return result
