import errno
import re

import numpy as np
import pytest
import tifffile
from conftest import make_dataset  # noqa: F401  (conftest puts the repo on sys.path)
from PIL import Image

from errors import UserError
from fileio import as_disk_error, atomic_output, is_image_file, read_image, write_image


@pytest.mark.parametrize("ext", [".png", ".tif", ".bmp"])
@pytest.mark.parametrize("shape,dtype", [((20, 30), np.uint8), ((20, 30, 3), np.uint8), ((20, 30), np.uint16),
                                         ((20, 30, 3), np.uint16), ((20, 30, 4), np.uint8)])
def test_round_trip_keeps_values_and_rgb_order(tmp_path, ext, shape, dtype):
    if ext == ".bmp" and dtype == np.uint16:
        pytest.skip("BMP has no 16-bit")
    a = np.random.default_rng(0).integers(0, np.iinfo(dtype).max, shape, dtype=dtype)
    write_image(tmp_path / f"a{ext}", a)
    b = read_image(tmp_path / f"a{ext}")
    assert b.dtype == dtype and np.array_equal(a, b)


def test_rgb_order_matches_pillow(tmp_path):
    a = np.zeros((4, 4, 3), np.uint8)
    a[..., 0] = 200  # red
    write_image(tmp_path / "red.png", a)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "red.png")), read_image(tmp_path / "red.png"))


@pytest.mark.parametrize("compression", ["lzw", "zlib", "zstd", None])
def test_compressed_tiffs(tmp_path, compression):
    a = np.random.default_rng(1).integers(0, 10000, (40, 50, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", a, compression=compression, predictor=compression is not None,
                     photometric="rgb")
    assert np.array_equal(read_image(tmp_path / "a.tif"), a)


def test_planar_multiband_tiff_is_channels_last(tmp_path):
    bands = np.random.default_rng(2).random((13, 24, 32)).astype(np.float32)
    tifffile.imwrite(tmp_path / "s2.tif", bands, planarconfig="separate", compression="zlib")
    img = read_image(tmp_path / "s2.tif")
    assert img.shape == (24, 32, 13) and np.array_equal(img, np.moveaxis(bands, 0, -1))


def test_float32_and_five_band_interleaved(tmp_path):
    a = np.random.default_rng(3).random((10, 12, 5)).astype(np.float32)
    write_image(tmp_path / "a.tif", a)
    assert np.array_equal(read_image(tmp_path / "a.tif"), a)


def test_non_ascii_path(tmp_path):
    folder = tmp_path / "данные 数据"
    folder.mkdir()
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for ext in (".png", ".tif", ".jpg"):
        write_image(folder / f"снимок{ext}", a)
        assert read_image(folder / f"снимок{ext}").shape == (3, 4)


def test_palette_png_indices_for_masks(tmp_path):
    p = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), mode="P")
    p.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    p.save(tmp_path / "m.png")
    assert read_image(tmp_path / "m.png", palette_indices=True).tolist() == [[0, 1], [2, 1]]
    assert read_image(tmp_path / "m.png").shape == (2, 2, 3)  # as a picture: its colours


def test_empty_and_corrupt_files_raise_user_errors(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(UserError, match=r"empty\.png.*empty"):
        read_image(tmp_path / "empty.png")
    write_image(tmp_path / "ok.png", np.zeros((8, 8), np.uint8))
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "bad.png").write_bytes(data[:33] + b"garbage" * 20)
    with pytest.raises(UserError, match=r"bad\.png.*corrupt"):
        read_image(tmp_path / "bad.png")
    (tmp_path / "bad.tif").write_bytes(b"II*\x00" + b"\x00" * 50)
    with pytest.raises(UserError, match=r"bad\.tif"):
        read_image(tmp_path / "bad.tif")


@pytest.mark.parametrize("ext", [".png", ".jpg", ".tif"])
def test_files_standing_in_for_images_name_the_fix(tmp_path, ext):
    """A clone without its large files, a failed download, a link to an unmounted drive: each says how to get
    the image."""
    cases = {"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 9\n": "git lfs pull",
             "/annex/objects/SHA256E-s9--4d7a.png\n": "git annex get",
             "\n<!DOCTYPE html>\n<html><body>Sign in</body></html>": "web page (HTML)"}
    for i, (text, fix) in enumerate(cases.items()):
        (tmp_path / f"{i}{ext}").write_text(text)
        with pytest.raises(UserError, match=rf"{i}\{ext}: is a .*{re.escape(fix)}"):
            read_image(tmp_path / f"{i}{ext}")
    (tmp_path / f"link{ext}").symlink_to("/media/usb/scene.tif")
    assert is_image_file(tmp_path / f"link{ext}")  # listed, so that reading it says what is wrong
    with pytest.raises(UserError, match=r"is a link to /media/usb/scene.tif, which does not exist"):
        read_image(tmp_path / f"link{ext}")


def test_atomic_output_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_writes_failing_on_a_full_disk_say_so(tmp_path):
    """Libraries that report a full disk without errno (numpy's tofile, torch's zip writer) get ENOSPC and the
    file's name, which run_cli says in one line; other errors stay as they are."""
    target = tmp_path / "mask.png"
    for e in (OSError("134091 requested and 32768 written"), RuntimeError("unexpected pos 25903104 vs 25903000"),
              OSError(errno.ENOSPC, "No space left on device")):
        full = as_disk_error(target, e)
        assert isinstance(full, OSError) and full.errno == errno.ENOSPC and full.filename == str(target)
    other = ValueError("bad value")
    assert as_disk_error(target, other) is other  # this disk has room
