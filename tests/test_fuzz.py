"""The readers under damaged files: a seeded fuzz of a few hundred mutations (bit flips, truncations, zeroed runs,
tags set to zero or huge) of real TIFF, GeoTIFF, PNG and JPEG files. Every damaged file reads or is one UserError
naming it: never another exception (a traceback), nor an allocation of what a lying header claims."""
import resource

import cv2
import numpy as np
import pytest
import tifffile
from conftest import GEO

from errors import UserError
from fileio import image_header, read_image
from raster import RasterReader, TiledTiffWriter, extratags, gdal_nodata

MUTATIONS = 60  # per base file


def base_files(tmp_path) -> list:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 10000, (70, 90, 3), dtype=np.uint16)
    files = {"tiled.tif": {"tile": (32, 32), "compression": "zlib"},
             "strips.tif": {"rowsperstrip": 9, "compression": "zlib"}, "geo.tif": {"extratags": GEO},
             "planar.tif": {"planarconfig": "separate", "photometric": "rgb", "compression": "zlib"}}
    paths = []
    for name, kw in files.items():
        data = np.moveaxis(image, -1, 0) if "planar" in name else image
        tifffile.imwrite(tmp_path / name, data, **kw)
        paths.append(tmp_path / name)
    for name, picture in (("rgb.png", image[..., 0].astype(np.uint8)), ("deep.png", image),
                          ("photo.jpg", (image // 40).astype(np.uint8))):
        cv2.imwrite(str(tmp_path / name), picture)
        paths.append(tmp_path / name)
    return paths


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    raw = bytearray(data)
    how = rng.integers(5)
    if how == 0:  # bit flips
        for pos in rng.integers(0, len(raw), rng.integers(1, 8)):
            raw[pos] ^= 1 << int(rng.integers(8))
    elif how == 1:  # cut short
        raw = raw[:int(rng.integers(8, len(raw)))]
    elif how == 2:  # a run of zeros
        pos = int(rng.integers(0, len(raw)))
        n = min(int(rng.integers(1, 64)), len(raw) - pos)
        raw[pos:pos + n] = bytes(n)
    else:  # a 4-byte field among the first bytes (headers, tags, offsets) set to zero or to a huge value
        pos = int(rng.integers(0, min(len(raw) - 4, 400)))
        raw[pos:pos + 4] = (b"\x00\x00\x00\x00", b"\xff\xff\xff\x7f", b"\xff\xff\x00\x00")[int(rng.integers(3))]
    return bytes(raw)


def read_all(path) -> None:
    """What predict.py and serve.py do with a file: its header, the whole image, its windows and nodata, and a
    GeoTIFF mask written with its georeference."""
    image_header(path)
    read_image(path)
    reader = RasterReader(path, cache_mb=1)
    try:
        reader.read(0, 0, reader.height, reader.width)
        gdal_nodata(reader.geo, path)
        with TiledTiffWriter(path.with_name("mask.tif"), reader.height, reader.width, 1, np.uint8,
                             extratags=extratags(reader.geo)) as out:
            out.write(np.zeros((reader.height, reader.width), np.uint8))
    finally:
        reader.close()


@pytest.mark.parametrize("seed", [0, 1])
def test_damaged_files_read_or_give_one_user_error(tmp_path, seed):
    rng = np.random.default_rng(seed)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcomes = {"read": 0, "user error": 0}
    for base in base_files(tmp_path):
        data = base.read_bytes()
        for i in range(MUTATIONS):
            bad = tmp_path / f"m{i}{base.suffix}"
            bad.write_bytes(mutate(data, rng))
            try:
                read_all(bad)
                outcomes["read"] += 1
            except UserError as e:
                assert str(bad) in str(e), e
                outcomes["user error"] += 1
            except Exception as e:
                raise AssertionError(f"{base.name} mutation {i}: {type(e).__name__}: {e}") from e
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
    assert outcomes["user error"] > 50 and grown_mb < 500, (outcomes, grown_mb)
