"""Pictures for people: any image as 8-bit RGB, class masks in colour, error maps, side-by-side panels."""
import cv2
import numpy as np

IGNORE_COLOR = (96, 96, 96)
FALSE_POSITIVE = (255, 64, 64)   # predicted, not in truth: red
FALSE_NEGATIVE = (64, 160, 255)  # in truth, missed: blue
TRUE_POSITIVE = (255, 255, 255)


def to_rgb8(image: np.ndarray) -> np.ndarray:
    """An (H, W[, C]) image of any dtype as (H, W, 3) uint8: first three channels (or grey), 8-bit data as is,
    anything else stretched per channel between its 2nd and 98th percentiles."""
    if image.ndim == 2:
        image = image[..., None]
    image = image[..., :3] if image.shape[2] >= 3 else np.repeat(image[..., :1], 3, axis=2)
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    flat = image.reshape(-1, 3).astype(np.float32)
    finite = flat[np.isfinite(flat).all(1)]
    lo, hi = (np.percentile(finite, [2, 98], axis=0) if len(finite) else (np.zeros(3), np.ones(3)))
    out = (image.astype(np.float32) - lo) / np.maximum(hi - lo, 1e-12)
    return (np.clip(np.nan_to_num(out), 0, 1) * 255).astype(np.uint8)


def class_colors(num_classes: int) -> np.ndarray:
    """Background black, binary foreground yellow (visible on dark and bright imagery), more classes in hues."""
    colors = np.zeros((256, 3), np.uint8)
    if num_classes == 2:
        colors[1] = (255, 220, 0)
    else:
        for c in range(1, num_classes):
            hue = int(180 * (c - 1) / max(num_classes - 1, 1))
            colors[c] = cv2.cvtColor(np.uint8([[[hue, 220, 255]]]), cv2.COLOR_HSV2RGB)[0, 0]
    colors[255] = IGNORE_COLOR
    return colors


def colorize(mask: np.ndarray, num_classes: int) -> np.ndarray:
    return class_colors(num_classes)[mask]


def overlay(rgb: np.ndarray, mask: np.ndarray, num_classes: int, alpha: float = 0.45) -> np.ndarray:
    """Classes painted over the picture; background left untouched."""
    colored = colorize(mask, num_classes).astype(np.float32)
    out = rgb.astype(np.float32)
    paint = (mask > 0)[..., None]
    return np.where(paint, (1 - alpha) * out + alpha * colored, out).astype(np.uint8)


def error_map(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Per pixel: correct black, false positive (pred foreground, truth other) red, false negative blue."""
    out = np.zeros((*truth.shape, 3), np.uint8)
    valid = truth != 255
    out[valid & (pred == truth) & (truth > 0)] = TRUE_POSITIVE
    out[valid & (pred != truth) & (pred > 0)] = FALSE_POSITIVE
    out[valid & (pred != truth) & (pred == 0)] = FALSE_NEGATIVE
    out[~valid] = IGNORE_COLOR
    return out


def panel(tiles: list[np.ndarray], titles: list[str] | None = None, gap: int = 4) -> np.ndarray:
    """Pictures side by side (same height), with optional captions above each."""
    h = max(t.shape[0] for t in tiles)
    scale = max(0.4, min(t.shape[1] for t in tiles) / 700)  # captions readable on large pictures too
    bar = int(18 * scale / 0.4) if titles else 0
    cols = []
    for i, t in enumerate(tiles):
        canvas = np.full((h + bar, t.shape[1], 3), 255, np.uint8)
        canvas[bar:bar + t.shape[0]] = t
        if titles:
            cv2.putText(canvas, titles[i], (2, int(bar * 0.72)), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0),
                        max(1, int(scale * 2)), cv2.LINE_AA)
        cols.append(canvas)
        cols.append(np.full((h + bar, gap, 3), 255, np.uint8))
    return np.concatenate(cols[:-1], axis=1)


def stack_rows(rows: list[np.ndarray], gap: int = 4) -> np.ndarray:
    width = max(r.shape[1] for r in rows)
    out = []
    for r in rows:
        out.append(np.pad(r, ((0, gap), (0, width - r.shape[1]), (0, 0)), constant_values=255))
    return np.concatenate(out, axis=0)[:-gap]


def confusion_png(cm: np.ndarray, names: list[str]) -> np.ndarray:
    """Row-normalised confusion matrix (truth rows, prediction columns) as a picture."""
    n, cell, margin = len(names), 56, 70
    rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    img = np.full((margin + n * cell + 10, margin + n * cell + 10, 3), 255, np.uint8)

    def text(s: str, x: int, y: int, color=(0, 0, 0)) -> None:
        cv2.putText(img, s, (x, y), cv2.FONT_HERSHEY_SIMPLEX, 0.45, color, 1, cv2.LINE_AA)

    for i in range(n):
        for j in range(n):
            shade = int(255 * (1 - rows[i, j]))
            y, x = margin + i * cell, margin + j * cell
            img[y:y + cell - 2, x:x + cell - 2] = (shade, shade, 255)
            text(f"{rows[i, j]:.2f}", x + 6, y + cell // 2 + 4, (0, 0, 0) if rows[i, j] < 0.6 else (255, 255, 255))
        text(names[i][:7], 4, margin + i * cell + cell // 2 + 4)
        text(names[i][:7], margin + i * cell + 4, margin - 10)
    text("truth \\ pred", 4, 20)
    return img
