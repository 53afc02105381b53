"""LLaVA-NeXT's any-resolution images: tiles, and the packing of their features into one sequence.

The image processor resizes an image into the best of the config's `image_grid_pinpoints`
(rows x cols tiles of S x S), pads it to that size, and cuts it into the tiles; the whole image
resized to S x S goes first. The tower encodes every tile alike ([T, side * side, D], side =
S / patch_size). Then, as transformers' `LlavaNextModel.pack_image_features` does:

    base tile features                     [side * side, D]
    grid tiles -> one feature map          [rows * side, cols * side, D]
      unpad: crop the rows (or columns) the padding added, to the original aspect ratio
                                           [H', W', D]
      an `image_newline` embedding after every row
                                           [H' * (W' + 1), D]
    image features = base, then the grid   [side * side + H' * (W' + 1), D]

The placeholder count of an image comes from the same arithmetic, so positions and features
agree by construction.
"""

from __future__ import annotations

import torch

from lmq.config import VisionConfig


def grid_shape(cfg: VisionConfig, image_size: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of tiles an image of (height, width) is cut into."""
    from transformers.image_processing_utils import select_best_resolution

    height, width = select_best_resolution(image_size, [list(p) for p in cfg.grid_pinpoints])
    return height // cfg.image_size, width // cfg.image_size


def num_tiles(cfg: VisionConfig, image_size: tuple[int, int]) -> int:
    """Tiles the tower encodes for one image: the base tile and the grid."""
    rows, cols = grid_shape(cfg, image_size)
    return 1 + rows * cols


def _unpadded(height: int, width: int, image_size: tuple[int, int]) -> tuple[slice, slice]:
    """The rows and columns of a [height, width] feature map of a padded image that hold the
    original image of (height, width) `image_size` (transformers' `unpad_image`, its rounding
    included)."""
    orig_h, orig_w = image_size
    if orig_w / orig_h > width / height:  # wider than the grid: padding above and below
        new_h = int(round(orig_h * (width / orig_w), 7))
        pad = (height - new_h) // 2
        return slice(pad, height - pad), slice(0, width)
    new_w = int(round(orig_w * (height / orig_h), 7))
    pad = (width - new_w) // 2
    return slice(0, height), slice(pad, width - pad)


def num_tokens(cfg: VisionConfig, image_size: tuple[int, int]) -> int:
    """Feature rows (= placeholder positions) of one image."""
    side = cfg.image_size // cfg.patch_size
    rows, cols = grid_shape(cfg, image_size)
    ys, xs = _unpadded(rows * side, cols * side, image_size)
    h, w = ys.stop - ys.start, xs.stop - xs.start
    return cfg.tokens_per_tile + h * (w + 1)


def pack(cfg: VisionConfig, feats: torch.Tensor, image_size: tuple[int, int], newline: torch.Tensor) -> torch.Tensor:
    """feats: [T, side * side, D] of one image's tiles (base first), newline: [D] -> [num_tokens, D]."""
    side = cfg.image_size // cfg.patch_size
    rows, cols = grid_shape(cfg, image_size)
    if feats.shape[0] != 1 + rows * cols:
        raise ValueError(f"an image of {image_size} needs {1 + rows * cols} tiles, got {feats.shape[0]}")
    d = feats.shape[-1]
    grid = feats[1:].view(rows, cols, side, side, d).permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, d)
    ys, xs = _unpadded(rows * side, cols * side, image_size)
    grid = grid[ys, xs]  # [H', W', D]
    grid = torch.cat([grid, newline.to(grid.dtype).expand(grid.shape[0], 1, d)], dim=1)  # [H', W' + 1, D]
    return torch.cat([feats[0], grid.reshape(-1, d)])
