"""Large rasters: windows read without loading the whole image, the tile grid over them, GeoTIFF georeferencing and
nodata. Used by the dataset tools and by predict.py; numpy and tifffile only.

A TIFF is read segment by segment (its strips or tiles, decoded on demand and cached for the current row of
windows), or memory-mapped when uncompressed; other formats are read whole.
"""
import contextlib
import queue
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

from errors import UserError, warn
from fileio import TIFF_EXTENSIONS, atomic_output, damaged, read_image, tiff_segments_problem, unreadable

# GeoTIFF and GDAL tags carried from a source raster to its tiles and back to the stitched raster.
GEO_TAGS = {33550: "ModelPixelScale", 33922: "ModelTiepoint", 34264: "ModelTransformation",
            34735: "GeoKeyDirectory", 34736: "GeoDoubleParams", 34737: "GeoAsciiParams", 42112: "GDAL_METADATA",
            42113: "GDAL_NODATA"}


def tile_starts(length: int, tile: int, stride: int, edge: str = "shift") -> list[int]:
    """Offsets of the tiles along one axis: every stride, then one tile flush with the end (shift) or reaching past
    it (pad). A length up to one tile gets the single offset 0."""
    if length <= tile:
        return [0]
    if edge == "pad":
        return list(range(0, length - tile + stride, stride))
    starts = list(range(0, length - tile + 1, stride))
    return [*starts, length - tile] if starts[-1] != length - tile else starts


def nodata_pixels(image: np.ndarray, nodata: float) -> np.ndarray:
    """(H, W) True where every band holds the nodata value; a NaN nodata value matches NaN pixels."""
    hit = np.isnan(image) if np.isnan(nodata) else image == nodata
    return hit if hit.ndim == 2 else hit.all(axis=2)


class RasterReader:
    """(H, W) or (H, W, C) windows of an image file, with its size, band count, dtype and GeoTIFF tags.

    cache_mb bounds the decoded TIFF segments kept for reuse (a row of windows shares its strips or tiles). A TIFF's
    segments are checked against the file when it opens: every part of the image must come from a segment inside the
    file, so a damaged file is an error, never pixels made up from uninitialised memory.
    """

    def __init__(self, path: Path, cache_mb: float = 256):
        self.path = Path(path)
        self.cache_bytes = cache_mb * 2 ** 20
        self.geo: dict = {}
        self.pages = 1  # images in the file; a multi-page TIFF is read as its first
        self._tif = self._array = None
        if self.path.suffix.lower() in TIFF_EXTENSIONS and self.path.exists() and self.path.stat().st_size:
            try:
                self._open_tiff()
            except UserError:
                self.close()
                raise
            except Exception:  # noqa: BLE001 -- tags that do not parse (tifffile raises many types)
                self.close()
                self._tif = None  # read_image gives the clear message
        if self._tif is None and self._array is None:
            self._array = read_image(self.path)
        if self._array is not None:
            self.height, self.width = self._array.shape[:2]
            self.bands = 1 if self._array.ndim == 2 else self._array.shape[2]
            self.dtype = self._array.dtype

    def _open_tiff(self) -> None:
        self._tif = tif = tifffile.TiffFile(self.path)
        page = tif.pages[0]
        self.geo = geo_tags(page, self.path)
        layout = _plain_layout(tif)
        if layout is None:
            self.pages = len(tif.series)
            tif.close()
            self._tif = None
            return  # stacks and pyramids: read_image handles or explains them
        self.height, self.width, self.bands, self.dtype = layout
        if not self.height or not self.width:
            raise damaged(self.path, f"it declares an empty image of {self.width} x {self.height} px")
        self._bits = np.dtype(self.dtype)  # as decoded: 1-bit TIFFs decode to bool, read() gives them as uint8 0/255
        self.dtype = np.dtype(np.uint8) if self._bits.kind == "b" else self._bits
        self._page = page
        self._segments = [page.decode(None, i)[1:] for i in range(len(page.dataoffsets))]  # positions only
        problem = tiff_segments_problem(page, self.path.stat().st_size)
        if problem:
            raise damaged(self.path, problem)
        if page.is_memmappable:
            data = tif.asarray(out="memmap")
            self._array = np.moveaxis(data, 0, -1) if page.shaped[0] > 1 else data
            tif.close()
            self._tif = None
            return
        self._cache: OrderedDict = OrderedDict()
        self._cached = 0

    def _segment(self, index: int) -> np.ndarray:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        fh, size = self._tif.filehandle, self._page.databytecounts[index]
        fh.seek(self._page.dataoffsets[index])
        try:
            seg = self._page.decode(fh.read(size) if size else None, index, jpegtables=self._page.jpegtables)[0]
        except Exception as e:  # noqa: BLE001 -- a damaged segment: the codecs raise many types
            raise unreadable(self.path, e) from None
        if seg is None:  # a sparse TIFF leaves empty segments out: they hold the nodata value
            seg = np.full(self._segments[index][1], self._page.nodata, self._bits)
        self._cache[index] = seg
        self._cached += seg.nbytes
        while self._cached > self.cache_bytes and len(self._cache) > 1:
            self._cached -= self._cache.popitem(last=False)[1].nbytes
        return seg

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """The window rows y..y+h, columns x..x+w (inside the raster)."""
        if self._array is not None:
            try:
                return np.ascontiguousarray(self._array[y:y + h, x:x + w])
            except OSError as e:  # a memory-mapped file cut short after it was opened
                raise unreadable(self.path, e) from None
        separate, contig = self._page.shaped[0], self._page.shaped[4]
        out = np.zeros((separate, h, w, contig), self._bits)
        for index, (pos, shape) in enumerate(self._segments):
            sy, sx, sh, sw = pos[2], pos[3], shape[1], shape[2]
            y0, y1, x0, x1 = max(y, sy), min(y + h, sy + sh), max(x, sx), min(x + w, sx + sw)
            if y0 < y1 and x0 < x1:
                seg = self._segment(index)
                try:
                    out[pos[0], y0 - y:y1 - y, x0 - x:x1 - x] = seg[0, y0 - sy:y1 - sy, x0 - sx:x1 - sx]
                except (ValueError, IndexError) as e:  # a segment that decodes to another shape than declared
                    raise unreadable(self.path, e) from None
        out = np.moveaxis(out[..., 0], 0, -1) if separate > 1 else out[0]
        out = out[..., 0] if out.shape[-1] == 1 else out
        return out.view(np.uint8) * np.uint8(255) if out.dtype.kind == "b" else out  # 1-bit: black and white, as shown

    def close(self) -> None:
        if self._tif is not None:
            self._tif.close()


# Tags carried from a raster to its outputs, with the TIFF type and value count GeoTIFF gives them: a tag of another
# type is damaged or foreign, and is left out rather than written back wrong.
GEO_TYPES = {33550: (12, 3), 33922: (12, None), 34264: (12, 16), 34735: (3, None), 34736: (12, None),
             34737: (2, None), 42112: (2, None), 42113: (2, None)}


def geo_tags(page, path: Path) -> dict:
    """The page's georeferencing and GDAL tags as {code: {"dtype", "count", "value"}}, JSON-friendly."""
    geo, odd = {}, []
    for code, (kind, count) in GEO_TYPES.items():
        if code not in page.tags:
            continue
        tag = page.tags[code]
        try:
            value = _plain(tag.value)
            value = value if kind == 2 or isinstance(value, list) else [value]
            ok = int(tag.dtype) == kind and (count is None or tag.count >= count) and (
                isinstance(value, str) if kind == 2 else all(isinstance(v, (int, float)) for v in value))
        except Exception:  # noqa: BLE001 -- a value tifffile cannot read: damaged
            ok = False
        if ok:
            geo[code] = {"dtype": kind, "count": tag.count, "value": value}
        else:
            odd.append(GEO_TAGS[code])
    if odd:
        warn(f"{path}: its {', '.join(odd)} tag(s) are damaged or of an unexpected type; they are not carried to "
             "the outputs")
    return geo


def gdal_nodata(geo: dict, path: Path) -> float | None:
    """The GDAL_NODATA value of a raster's tags, None where it has none or it is not a number."""
    text = str(geo.get(42113, {}).get("value", "")).strip("\x00 ")
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        warn(f"{path}: its GDAL_NODATA tag {text[:20]!r} is not a number; no pixel is taken as nodata (give "
             "--nodata)")
        return None


def _plain_layout(tif: tifffile.TiffFile) -> tuple[int, int, int, np.dtype] | None:
    """(height, width, bands, dtype) of a TIFF holding one plain image; None for stacks and pyramids."""
    separate, depth, height, width, contig = tif.pages[0].shaped
    if len(tif.series) != 1 or len(tif.series[0].pages) != 1 or depth != 1:
        return None
    return height, width, separate * contig, np.dtype(tif.pages[0].dtype)


def _plain(value):
    """Tag values as JSON-friendly types."""
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, (tuple, list, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def shifted_geo(geo: dict, y: int, x: int) -> dict:
    """The georeferencing of a window starting at pixel (y, x): the tie point or transform moved by the offset."""
    out = {code: dict(tag) for code, tag in geo.items()}
    if 34264 in geo:  # 4x4 affine: X = a*col + b*row + d, Y = e*col + f*row + h
        m = list(geo[34264]["value"])
        m[3] += m[0] * x + m[1] * y
        m[7] += m[4] * x + m[5] * y
        out[34264]["value"] = m
    elif 33922 in geo and 33550 in geo:
        sx, sy = geo[33550]["value"][:2]
        tie = list(geo[33922]["value"])  # raster (I, J) -> model (X, Y); north-up: Y falls as rows grow
        tie[3] += x * sx
        tie[4] -= y * sy
        out[33922]["value"] = tie
    return out


def extratags(geo: dict) -> list:
    """tifffile's extratags for a georeferencing dict (JSON keys come back as strings)."""
    tags = []
    for code, tag in sorted((int(c), t) for c, t in geo.items()):
        value = tag["value"]
        tags.append((code, tag["dtype"], len(value) if isinstance(value, list) else tag["count"],
                     tuple(value) if isinstance(value, list) else value, True))
    return tags


def check_size(reader: RasterReader, image: RasterReader, what: str) -> None:
    if (reader.height, reader.width) != (image.height, image.width):
        raise UserError(f"{reader.path}: {what} is {reader.width}x{reader.height} but the image {image.path} is "
                        f"{image.width}x{image.height}; every raster of a scene must have the image's size")


class TiledTiffWriter:
    """An (H, W) or (H, W, C) raster written as a tiled, compressed (Deflate) TIFF from bands of rows given top to
    bottom: memory holds one row of tiles. tifffile pulls the tiles in a thread of its own; the file appears under
    its name only when complete. Use as a context manager; write(rows) in order, covering every row once."""

    def __init__(self, path: Path, height: int, width: int, bands: int, dtype, tile: int = 256,
                 extratags: list | None = None):
        self.path, self.height, self.width, self.tile = Path(path), height, width, tile
        self.shape = (height, width) if bands == 1 else (height, width, bands)
        self.dtype = np.dtype(dtype)
        self.extratags = extratags or []
        self.rows: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.ended = False  # the end-of-rows marker was taken
        self.thread = threading.Thread(target=self._run, name="segkit-tiff-writer", daemon=True)

    def __enter__(self) -> "TiledTiffWriter":
        self.thread.start()
        return self

    def __exit__(self, kind, *_) -> None:
        self.rows.put(None)
        self.thread.join()
        if kind is None and self.error is not None:
            raise self.error

    def write(self, rows: np.ndarray) -> None:
        if self.error is not None:
            raise self.error
        self.rows.put(rows)

    def _run(self) -> None:
        try:
            big = self.height * self.width * self.dtype.itemsize * (self.shape[2] if len(self.shape) > 2 else 1)
            with atomic_output(self.path) as tmp:
                tifffile.imwrite(tmp, self._tiles(), shape=self.shape, dtype=self.dtype, tile=(self.tile, self.tile),
                                 compression="zlib", photometric="minisblack", planarconfig="contig",
                                 bigtiff=big > 2 ** 31, extratags=self.extratags)
        except BaseException as e:  # noqa: BLE001 -- handed to the caller's thread
            self.error = e
            while not self.ended and self.rows.get() is not None:  # let the caller finish putting
                pass

    def _tiles(self) -> Iterator[np.ndarray]:
        t, pending = self.tile, None  # rows received, not yet placed
        for y in range(0, self.height, t):
            h = min(t, self.height - y)
            out = np.zeros((t, self.width + (-self.width) % t, *self.shape[2:]), self.dtype)
            filled = 0
            while filled < h:
                if pending is None or len(pending) == 0:
                    pending = self.rows.get()
                    if pending is None:
                        self.ended = True
                        raise ValueError(f"{self.path}: {y + filled} of {self.height} rows were written")
                take = min(len(pending), h - filled)
                out[filled:filled + take, :self.width] = pending[:take]
                pending, filled = pending[take:], filled + take
            for x in range(0, self.width, t):
                yield out[:, x:x + t]


class PngWriter:
    """An (H, W) uint8 or uint16 mask written as a PNG from bands of rows given top to bottom, compressed as they
    come: memory never holds the whole mask, whatever its size. The file appears under its name only when complete.
    Use as a context manager, like TiledTiffWriter."""

    def __init__(self, path: Path, height: int, width: int, dtype):
        self.path, self.height, self.width, self.dtype = Path(path), height, width, np.dtype(dtype)
        self.rows = 0

    def __enter__(self) -> "PngWriter":
        with contextlib.ExitStack() as stack:
            self._file = stack.enter_context(open(stack.enter_context(atomic_output(self.path)), "wb"))
            self._close = stack.pop_all()  # closes the file, then renames it into place (or removes it on an error)
        self._file.write(b"\x89PNG\r\n\x1a\n")
        self._chunk(b"IHDR", struct.pack(">IIBBBBB", self.width, self.height, 8 * self.dtype.itemsize, 0, 0, 0, 0))
        self._zip = zlib.compressobj(6)
        return self

    def write(self, rows: np.ndarray) -> None:
        data = np.zeros((len(rows), 1 + self.width * self.dtype.itemsize), np.uint8)  # filter byte 0, then the row
        data[:, 1:] = rows.astype(self.dtype.newbyteorder(">")).view(np.uint8).reshape(len(rows), -1)
        self._chunk(b"IDAT", self._zip.compress(data.tobytes()))
        self.rows += len(rows)

    def _chunk(self, kind: bytes, data: bytes) -> None:
        if data or kind != b"IDAT":
            self._file.write(struct.pack(">I", len(data)) + kind + data
                             + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self._close.__exit__(kind, value, traceback)
            return
        with self._close:
            if self.rows != self.height:
                raise ValueError(f"{self.path}: {self.rows} of {self.height} rows were written")
            self._chunk(b"IDAT", self._zip.flush())
            self._chunk(b"IEND", b"")
