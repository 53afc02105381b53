"""Images in a prompt: placeholder expansion, where each image's tokens sit, and prefix-cache keys.

A chat template writes one placeholder token per image; the prompt is expanded so that each
image owns `num_tokens` consecutive positions, as transformers' LlavaProcessor and
LlavaNextProcessor do (LLaVA: the same count for every image; LLaVA-NeXT: a count that depends on
the image's size, see vision.anyres):

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
    """One image, preprocessed for the tower (vision.preprocess)."""

    pixel_values: torch.Tensor  # [T, 3, S, S] float32, T tiles: 1 for LLaVA; LLaVA-NeXT: the whole image, then its grid
    image_size: tuple[int, int]  # (height, width) of the original image: LLaVA-NeXT unpads its grid to it
    num_tokens: int  # placeholder positions (= feature rows) the image fills
    content_hash: int  # < 0: see vision.preprocess.content_hash


@dataclass(frozen=True)
class ImageInput:
    """One image of a request and the prompt positions its features fill."""

    image: ProcessedImage
    offset: int  # first of its positions in the expanded prompt

    @property
    def num_tokens(self) -> int:
        return self.image.num_tokens

    @property
    def content_hash(self) -> int:
        return self.image.content_hash

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
    """Each placeholder -> its image's `num_tokens` placeholders, one image per placeholder, in order."""
    if not images:
        return ids, []
    if vision is None:
        raise ValueError("this model does not accept images (it is a text-only model)")
    token = vision.image_token_id
    found = [i for i, t in enumerate(ids) if t == token]
    if len(found) != len(images):
        raise ValueError(f"the prompt has {len(found)} image placeholder tokens (id {token}) but "
                         f"{len(images)} images were given: each image needs exactly one")
    out: list[int] = []
    inputs: list[ImageInput] = []
    start = 0
    for pos, image in zip(found, images):
        out.extend(ids[start:pos])
        inputs.append(ImageInput(image, len(out)))
        out.extend([token] * image.num_tokens)
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
