"""Prediction on images of any size: whole images padded to a multiple of 32, or a sliding window with Gaussian
blending of logits for images larger than the tile; optional flip / D4 test-time augmentation.

Outputs always have the input's height and width. Memory on the model's device is bounded by the tile batch; the
blended output lives on the device of the input image (keep huge images on the CPU).
"""
import contextlib
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

TTA_MODES = ("none", "flip", "d4")


def _d4_ops(mode: str) -> list[tuple[int, bool]]:
    """(quarter turns, horizontal flip) pairs of the TTA group."""
    if mode == "none":
        return [(0, False)]
    if mode == "flip":
        return [(0, False), (0, True)]
    return [(k, f) for k in range(4) for f in (False, True)]


def forward_tta(model: nn.Module, x: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """Mean of the model's logits over the TTA transforms, each undone on the output."""
    out = None
    ops = _d4_ops(tta)
    for k, flip in ops:
        t = x.flip(-1) if flip else x
        t = torch.rot90(t, k, (-2, -1)) if k else t
        y = model(t).float()
        y = torch.rot90(y, -k, (-2, -1)) if k else y
        y = y.flip(-1) if flip else y
        out = y if out is None else out + y
    return out / len(ops)


def _pad(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pad bottom/right to (height, width); mirrored where the image is big enough, zeros (the mean) otherwise."""
    ph, pw = height - x.shape[-2], width - x.shape[-1]
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < x.shape[-2] and pw < x.shape[-1] else "constant"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


@functools.lru_cache(maxsize=8)
def gaussian_window(tile: int, device: torch.device) -> torch.Tensor:
    """Weights peaking at the tile centre (sigma = tile/8), floored so edge pixels still count a little."""
    r = torch.arange(tile, dtype=torch.float32, device=device) - (tile - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * (tile / 8) ** 2))
    w = g[:, None] * g[None, :]
    return (w / w.max()).clamp_min(1e-3)


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile offsets covering [0, length): regular steps, the last one flush with the end."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, tile_size: int, overlap: float = 0.5, tta: str = "none",
            batch_size: int = 8, autocast=contextlib.nullcontext, min_size: int = 32,
            resize_to: int | None = None) -> torch.Tensor:
    """(N, C, H, W) normalised images -> (N, K, H, W) float32 logits, on the images' device.

    Images that fit in tile_size x tile_size are run whole (padded to a multiple of 32 and to at least min_size,
    the batch at once); larger ones slide a tile_size window with the given overlap, tiles batched by batch_size.
    resize_to: for models trained with --resize, images are stretched to that square and the logits back.
    """
    h, w = images.shape[-2:]
    device = next(model.parameters()).device
    if resize_to:
        x = F.interpolate(images.to(device, non_blocking=True).float(), (resize_to, resize_to), mode="bilinear",
                          align_corners=False)
        with autocast():
            logits = forward_tta(model, x, tta)
        return F.interpolate(logits, (h, w), mode="bilinear", align_corners=False).to(images.device)
    if h <= tile_size and w <= tile_size:
        x = _pad(images.to(device, non_blocking=True), max(min_size, math.ceil(h / 32) * 32),
                 max(min_size, math.ceil(w / 32) * 32))
        with autocast():
            return forward_tta(model, x, tta)[..., :h, :w].to(images.device)
    return torch.cat([_slide(model, img, tile_size, overlap, tta, batch_size, autocast) for img in images])


def _slide(model, image, tile, overlap, tta, batch_size, autocast) -> torch.Tensor:
    device = next(model.parameters()).device
    _, h, w = image.shape
    padded = _pad(image[None], max(h, tile), max(w, tile))[0]
    ph, pw = padded.shape[-2:]
    stride = max(1, int(tile * (1 - overlap)))
    boxes = [(y, x) for y in tile_starts(ph, tile, stride) for x in tile_starts(pw, tile, stride)]
    weight = gaussian_window(tile, device)
    weight_here = weight.to(image.device)  # huge images are blended in host memory: copy the window there once
    out = norm = None
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i:i + batch_size]
        tiles = torch.stack([padded[:, y:y + tile, x:x + tile] for y, x in chunk]).to(device, non_blocking=True)
        with autocast():
            logits = forward_tta(model, tiles, tta) * weight
        logits = logits.to(image.device)
        if out is None:
            out = torch.zeros((logits.shape[1], ph, pw), dtype=torch.float32, device=image.device)
            norm = torch.zeros((ph, pw), dtype=torch.float32, device=image.device)
        for (y, x), t in zip(chunk, logits, strict=True):
            out[:, y:y + tile, x:x + tile] += t
            norm[y:y + tile, x:x + tile] += weight_here
    return (out / norm)[None, :, :h, :w]
