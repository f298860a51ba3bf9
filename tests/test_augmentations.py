import warnings

import numpy as np
import pytest
from conftest import make_dataset, run_script

from augmentations import PRESETS, train_transform
from labels import IGNORE_INDEX

KINDS = {  # name: (channels, dtype, 3-channel 8-bit)
    "grey8": (1, np.uint8, False),
    "rgb8": (3, np.uint8, True),
    "rgbn16": (4, np.float32, False),  # 16-bit input reaches the transforms range-scaled to [0, 1]
    "s2_13": (13, np.float32, False),
}


def striped(channels: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """A 96x80 image whose every channel is bright exactly where the mask is foreground."""
    mask = np.zeros((96, 80), np.uint8)
    mask[20:60, 10:50] = 1
    top = 255 if dtype == np.uint8 else 1.0
    image = np.repeat((0.15 + 0.7 * mask)[..., None], channels, axis=2) * top
    return image.astype(dtype), mask


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_run_quietly_keep_geometry_and_size(preset, kind):
    channels, dtype, rgb8 = KINDS[kind]
    image, mask = striped(channels, dtype)
    transform = train_transform(preset, 64, rgb8, resize=False)
    agree = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated arguments, no runtime warnings
        for seed in range(12):
            transform.set_random_seed(seed)
            out = transform(image=image, mask=mask)
            img, m = out["image"], out["mask"]
            assert img.shape == (64, 64, channels) and m.shape == (64, 64) and img.dtype == dtype
            assert set(np.unique(m)) <= {0, 1, IGNORE_INDEX}
            valid = m != IGNORE_INDEX
            bright = img[..., 0].astype(np.float32) > (0.5 * (255 if dtype == np.uint8 else 1.0))
            if valid.sum() > 100:
                agree.append((bright[valid] == (m[valid] == 1)).mean())
    # the image and its mask moved together (colour noise, blur edges and dropout holes cost a few pixels)
    assert np.mean(agree) > 0.9, agree


def test_resize_mode_stretches_to_size():
    image, mask = striped(3, np.uint8)
    out = train_transform("none", 32, True, resize=True)(image=image, mask=mask)
    assert out["image"].shape == (32, 32, 3) and set(np.unique(out["mask"])) <= {0, 1}


def test_small_images_are_padded_with_ignored_pixels():
    image, mask = striped(3, np.uint8)
    out = train_transform("none", 128, True, resize=False)(image=image, mask=mask)
    assert out["image"].shape == (128, 128, 3)
    assert (out["mask"] == IGNORE_INDEX).sum() == 128 * 128 - 96 * 80


def test_preview_cli_writes_pictures(tmp_path):
    ds = make_dataset(tmp_path / "ds", n_train=3, dtype=np.uint16, bands=("nir",))
    r = run_script("augmentations.py", "--preview", ds, "-a", "hard", "-n", "2", "--add-dirs", "nir",
                   "--image-size", "32", "-o", tmp_path / "pics")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "pics").iterdir()) == ["t000.png", "t001.png"]
