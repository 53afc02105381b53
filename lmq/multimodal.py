"""Images in a prompt: placeholder expansion, where each image's tokens sit, and prefix-cache keys.

A chat template writes one placeholder token per image; the prompt is expanded so that each
image owns `tokens_per_image` consecutive positions, as transformers' LlavaProcessor does:

    ids:       [ USER :  <img>  \\n  what  is  this ]
    expanded:  [ USER :  <img> <img> ... <img>  \\n  what  is  this ]
                         ^ offset   (num_tokens positions)

In prefill the embeddings at those positions are replaced by the image's features; a chunk
that ends inside an image takes the features of the positions it covers. For the prefix cache,
image positions are keyed by the image's content hash (a negative number, never a token id),
so the same text with another image shares no block past the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmq.config import VisionConfig


@dataclass(frozen=True)
class ProcessedImage:
    pixel_values: torch.Tensor  # [3, S, S] float32, resized and normalized for the tower
    content_hash: int  # < 0: see vision.preprocess.content_hash


@dataclass(frozen=True)
class ImageInput:
    """One image of a request and the prompt positions its features fill."""

    pixel_values: torch.Tensor  # [3, S, S]
    content_hash: int
    offset: int  # first of its positions in the expanded prompt
    num_tokens: int

    @property
    def end(self) -> int:
        return self.offset + self.num_tokens


@dataclass(frozen=True)
class ImageEmbeds:
    """One step's image features and the rows of the flat token batch they replace."""

    rows: torch.Tensor  # [M] int64 on the device
    embeds: torch.Tensor  # [M, hidden]


def expand_image_tokens(ids: list[int], images: list[ProcessedImage],
                        vision: VisionConfig | None) -> tuple[list[int], list[ImageInput]]:
    """Each placeholder -> `tokens_per_image` placeholders, one per image, in order."""
    if not images:
        return ids, []
    if vision is None:
        raise ValueError("this model does not accept images (it is a text-only model)")
    token = vision.image_token_id
    found = [i for i, t in enumerate(ids) if t == token]
    if len(found) != len(images):
        raise ValueError(f"the prompt has {len(found)} image placeholder tokens (id {token}) but "
                         f"{len(images)} images were given: each image needs exactly one")
    n = vision.tokens_per_image
    out: list[int] = []
    inputs: list[ImageInput] = []
    start = 0
    for pos, image in zip(found, images):
        out.extend(ids[start:pos])
        inputs.append(ImageInput(image.pixel_values, image.content_hash, len(out), n))
        out.extend([token] * n)
        start = pos + 1
    out.extend(ids[start:])
    return out, inputs


def cache_key_ids(ids: list[int], images: list[ImageInput]) -> list[int]:
    """The prompt with every image position replaced by its image's content hash."""
    key = list(ids)
    for image in images:
        key[image.offset:image.end] = [image.content_hash] * image.num_tokens
    return key


def chunk_image_rows(start: int, num_new: int, images: list[ImageInput]) -> list[tuple[int, int, int]]:
    """Where a chunk of positions [start, start + num_new) meets the images: (image index, first
    feature row, rows) for each overlap; the chunk row of an overlap is its first position - start."""
    out = []
    end = start + num_new
    for i, image in enumerate(images):
        lo, hi = max(start, image.offset), min(end, image.end)
        if lo < hi:
            out.append((i, lo - image.offset, hi - lo))
    return out
