"""Reading and writing images the way users have them, and atomic file writes.

Images come back as stored: (H, W) or (H, W, C) numpy arrays of their own dtype, colour channels in RGB order.
TIFFs go through tifffile (any band count, planar or interleaved, LZW/Deflate/ZSTD via imagecodecs); everything
else through OpenCV's imdecode/imencode on bytes, so paths with non-ASCII characters work on every platform.
"""
import contextlib
import errno
import io
import json
import logging
import mmap
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile

from errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
TIFF_EXTENSIONS = (".tif", ".tiff")

# OpenCV refuses to decode larger images (its default, unless OPENCV_IO_MAX_IMAGE_PIXELS says otherwise).
CV2_MAX_PIXELS = int(os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", 2 ** 30))
JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # SOFn markers

cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # we report broken files ourselves
logging.getLogger("tifffile").setLevel(logging.CRITICAL)  # its notes on damaged tags: we report those files ourselves
_UMASK = os.umask(0)
os.umask(_UMASK)


def is_image_file(path: Path) -> bool:
    """An image by its name; links to nothing count, so that reading them says what is wrong."""
    return (path.is_file() or (path.is_symlink() and not path.exists())) \
        and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def read_list(path: Path, flag: str) -> list[str]:
    """The entries of a list file a user wrote, one per line: as Windows editors save it too (a byte-order mark,
    CRLF), without blank lines, # comments and quotes around an entry."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{flag} {path}: not UTF-8 text; save it as UTF-8") from None
    lines = (line.strip() for line in text.splitlines())
    return [line[1:-1] if len(line) > 1 and line[0] == line[-1] and line[0] in "\"'" else line
            for line in lines if line and not line.startswith("#")]


def dead_link(path: Path, others: int = 0) -> UserError:
    """The error for a link to a file that does not exist (others: how many more such links were found)."""
    more = f"; {others} more link(s) point nowhere too" if others else ""
    return UserError(f"{path}: is a link to {os.readlink(path)}, which does not exist (a drive not mounted? "
                     f"git-annex: run `git annex get`){more}")


def _stand_in(path: Path) -> str | None:
    """What a file that holds no image holds instead, where that names the fix (a dataset cloned without its
    large files, a download that fetched a web page), else None."""
    try:
        head = path.read_bytes()[:512] if path.stat().st_size < 4096 else b""
    except OSError:
        return None
    if head.startswith(b"version https://git-lfs"):
        return "is a Git LFS pointer, not the image: run `git lfs pull` in its repository"
    if b"annex/objects/" in head:
        return "is a git-annex pointer, not the image: run `git annex get` in its repository"
    if head.lstrip()[:14].lower().startswith((b"<!doctype html", b"<html")):
        return "is a web page (HTML), not an image: the download failed; download the file again"
    return None


# ------------------------------------------------------------------------------------------------- headers
@dataclass
class ImageHeader:
    """What an image file declares in its header, read without decoding a pixel: the size and type of the array
    read_image would return (bands None where only decoding tells, e.g. palette PNGs)."""
    path: Path
    height: int
    width: int
    bands: int | None
    dtype: np.dtype

    @property
    def pixels(self) -> int:
        return self.height * self.width

    def size(self) -> str:
        return f"{self.width} x {self.height} px ({self.pixels / 1e6:,.1f} Mpx)"


def image_header(path: Path, data: bytes | np.ndarray | None = None) -> ImageHeader | None:
    """The header of a PNG, JPEG, BMP or TIFF file (or of its bytes, `data`), None where there is none to read.
    A header whose parts point past the file's end (a chunk that claims 2 GB in a 3 KB PNG) is damaged: a
    UserError, before any decoder allocates what it claims."""
    path = Path(path)
    if data is not None:
        view = memoryview(data).cast("B")
        return _header(path, view, lambda: io.BytesIO(view))
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:  # the file's bytes, read only where looked at
            view = memoryview(m)
            try:
                return _header(path, view, lambda: path)
            finally:
                view.release()


def _header(path: Path, data: memoryview, tiff_source: Callable) -> ImageHeader | None:
    head = bytes(data[:8])
    try:
        if head == b"\x89PNG\r\n\x1a\n":
            return _png_header(path, data)
        if head.startswith(b"\xff\xd8"):
            return _jpeg_header(path, data)
        if head.startswith(b"BM") and len(data) >= 30:
            width, height = struct.unpack_from("<ii", data, 18)
            return ImageHeader(path, abs(height), width, None, np.dtype(np.uint8)) if width > 0 else None
        if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            return _tiff_header(path, tiff_source(), len(data))
    except (struct.error, IndexError):
        raise damaged(path, "its header is cut short") from None
    return None


def _png_header(path: Path, data: memoryview) -> ImageHeader:
    if bytes(data[8:16]) != b"\x00\x00\x00\rIHDR":
        raise damaged(path, "its first chunk is not the IHDR header")
    width, height, depth, color = struct.unpack_from(">IIBB", data, 16)
    pos = 8
    while pos < len(data):  # every chunk must lie inside the file
        length, kind = struct.unpack_from(">I4s", data, pos)
        if pos + 12 + length > len(data):
            name = kind.decode("latin-1") if kind.isalpha() else "a"
            raise damaged(path, f"{name} chunk claims {length:,} bytes, but the file ends "
                                f"{max(0, len(data) - pos - 12):,} bytes later: cut short or damaged")
        pos += 12 + length
        if kind == b"IEND":
            break
    bands = {0: 1, 2: 3, 4: 2, 6: 4}.get(color)  # palette (3): colours, with or without transparency
    return ImageHeader(path, height, width, bands, np.dtype(np.uint16 if depth == 16 else np.uint8))


def _jpeg_header(path: Path, data: memoryview) -> ImageHeader | None:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF or 0xD0 <= marker <= 0xD8 or marker == 0x01:  # fill bytes and markers without a length
            pos += 1 if marker == 0xFF else 2
            continue
        if marker in JPEG_FRAMES:
            height, width, components = struct.unpack_from(">HHB", data, pos + 5)
            return ImageHeader(path, height, width, 1 if components == 1 else 3, np.dtype(np.uint8)) \
                if height else None
        pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
    return None


def _tiff_header(path: Path, source, size: int) -> ImageHeader | None:
    try:
        with tifffile.TiffFile(source) as tif:
            series = tif.series[0]
            shape, axes, dtype = series.shape, series.axes, series.dtype
            problems = [tiff_segments_problem(page, size) for page in series.pages if page is not None]
    except Exception:  # noqa: BLE001 -- tags that do not parse: reading the file says why
        return None
    if any(problems):
        raise damaged(path, next(filter(None, problems)))
    if "Y" not in axes or "X" not in axes:
        return None
    bands = int(np.prod([n for n, a in zip(shape, axes, strict=True) if a not in "YX"], dtype=np.int64))
    return ImageHeader(path, shape[axes.index("Y")], shape[axes.index("X")], bands,
                       np.dtype(np.uint8) if np.dtype(dtype).kind == "b" else np.dtype(dtype))


def tiff_segments_problem(page, file_size: int) -> str | None:
    """Why a TIFF page's strips or tiles cannot give its pixels (too few for its declared size, or lying past the
    file's end), or None. tifffile would fill what is missing with zeros after a log line: made-up pixels."""
    expected = int(np.prod(page.chunked))  # strips or tiles of every plane
    if len(page.dataoffsets) < expected:
        return (f"it declares {page.shaped[3]} x {page.shaped[2]} px but holds {len(page.dataoffsets)} of the "
                f"{expected} {'tiles' if page.is_tiled else 'strips'} they need")
    ends = np.asarray(page.dataoffsets, np.int64) + np.asarray(page.databytecounts, np.int64)
    if (ends > file_size).any():
        return f"a segment ends at byte {int(ends.max()):,}, past the file's end at {file_size:,}"
    return None


def _read_tiff(path: Path) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        for page in series.pages:
            problem = tiff_segments_problem(page, path.stat().st_size) if page is not None else None
            if problem:
                raise damaged(path, problem)
        data = series.asarray()
        axes = series.axes
    # Move the band axis (samples S, channels C, pages I/Q) behind Y and X: planar GeoTIFFs store bands first.
    if data.ndim == 3 and axes.index("Y") == 1 and axes.index("X") == 2:
        data = np.moveaxis(data, 0, -1)
    elif data.ndim > 3 or data.ndim < 2 or (data.ndim == 3 and axes[:2] != "YX"):
        raise UserError(f"{path}: unsupported TIFF layout (axes {axes}, shape {data.shape}); save one image per "
                        "file as height x width x bands")
    if data.dtype == bool:  # 1-bit TIFF: black and white, as viewers show it
        data = data.astype(np.uint8) * 255
    return np.ascontiguousarray(data)


def exif_orientation(path: Path) -> int:
    """A JPEG's EXIF orientation: 1 upright as stored, 2-8 flipped or turned (phone pictures), 0 none."""
    with open(path, "rb") as f:
        data = f.read(2 ** 16)
    pos = 2 if data.startswith(b"\xff\xd8") else len(data)
    try:
        while pos + 4 <= len(data) and data[pos] == 0xFF and data[pos + 1] not in (0xDA, 0xD9):
            length = struct.unpack_from(">H", data, pos + 2)[0]
            if data[pos + 1] == 0xE1 and data[pos + 4:pos + 10] == b"Exif\x00\x00":
                tiff = data[pos + 10:pos + 2 + length]
                order = "<" if tiff[:2] == b"II" else ">"
                ifd = struct.unpack_from(order + "I", tiff, 4)[0]
                for i in range(struct.unpack_from(order + "H", tiff, ifd)[0]):
                    tag, _, _, value = struct.unpack_from(order + "HHIH", tiff, ifd + 2 + 12 * i)
                    if tag == 0x0112:
                        return value
                return 0
            pos += 2 + length
    except struct.error:  # a damaged EXIF block: no orientation to apply
        return 0
    return 0


def is_palette_png(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(26)
    return head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) == 26 and head[25] == 3


def read_image(path: Path, palette_indices: bool = False) -> np.ndarray:
    """Read one image file as stored. palette_indices: return a palette PNG's indices, not its colours (masks)."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise UserError(f"{path}: the file is empty (0 bytes); re-export it or remove this sample")
        if path.suffix.lower() in TIFF_EXTENSIONS:
            return _read_tiff(path)
        if palette_indices and is_palette_png(path):
            from PIL import Image  # Pillow comes with matplotlib; OpenCV cannot return palette indices

            with Image.open(path) as im:
                return np.asarray(im)
        # JPEGs are turned upright by their EXIF orientation (IMREAD_UNCHANGED would ignore it); they hold no alpha
        # or high bit depth for the other flags to lose.
        jpeg = path.suffix.lower() in (".jpg", ".jpeg")
        raw = np.fromfile(path, np.uint8)
        check_decodable(image_header(path, raw))
        data = cv2.imdecode(raw, cv2.IMREAD_ANYCOLOR if jpeg else cv2.IMREAD_UNCHANGED)
    except UserError:
        raise
    except FileNotFoundError:
        raise (dead_link(path) if path.is_symlink() else UserError(f"{path}: file not found")) from None
    except Exception as e:  # noqa: BLE001 -- tifffile/Pillow raise many types for broken files
        raise unreadable(path, e) from None
    if data is None:
        raise UserError(f"{path}: " + (_stand_in(path) or "cannot be decoded; the file is corrupt or not an image: "
                                       "re-export it or remove this sample"))
    if 0 in data.shape[:2]:
        raise damaged(path, f"it holds an empty image of {data.shape[1]} x {data.shape[0]} px")
    if data.ndim == 3 and data.shape[2] == 3:
        data = cv2.cvtColor(data, cv2.COLOR_BGR2RGB)
    elif data.ndim == 3 and data.shape[2] == 4:
        data = cv2.cvtColor(data, cv2.COLOR_BGRA2RGBA)
    return data


def check_decodable(header: ImageHeader | None) -> None:
    """Refuse an image OpenCV would decode (not a TIFF) but that is larger than it decodes, by its header."""
    if header is not None and header.pixels > CV2_MAX_PIXELS and header.path.suffix.lower() not in TIFF_EXTENSIONS:
        raise UserError(f"{header.path}: the image is {header.size()}, more than OpenCV decodes "
                        f"({CV2_MAX_PIXELS / 1e6:,.0f} Mpx); save it as a tiled GeoTIFF, which segkit reads in windows")


def as_disk_error(path: Path, e: Exception) -> Exception:
    """A failed write as the full disk it was (ENOSPC, said in one line by run_cli) where the writing library did
    not say so (numpy's tofile, torch's zip writer, the ONNX exporters); any other error as it is."""
    if getattr(e, "errno", None) == errno.ENOSPC and getattr(e, "filename", None):
        return e
    full = getattr(e, "errno", None) == errno.ENOSPC or any(
        s in str(e) for s in ("No space left", "requested and", "unexpected pos"))
    with contextlib.suppress(OSError):
        full = full or shutil.disk_usage(Path(path).parent).free < 2 ** 20
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) if full else e


def damaged(path: Path, what: str) -> UserError:
    """The error for a file whose structure contradicts itself (found before any decoder trusts it)."""
    return UserError(f"{path}: the file is corrupt ({what}); re-export it or remove this sample")


def unreadable(path: Path, e: Exception) -> UserError:
    """The error for a file its decoder refuses (tifffile, imagecodecs and Pillow raise many types)."""
    if "imagecodecs" in str(e):
        return UserError(f"{path}: compressed TIFF needs imagecodecs: pip install imagecodecs")
    if stand_in := _stand_in(path):
        return UserError(f"{path}: {stand_in}")
    return UserError(f"{path}: cannot be read ({type(e).__name__}: {str(e)[:120]}); the file is corrupt or not an "
                     "image: re-export it or remove this sample")


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename, else it is removed.

    A reader never sees a half-written file, and a killed writer leaves only a `*.tmp` file behind.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    tmp.chmod(0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def scratch_folder(beside: Path) -> Iterator[Path]:
    """A new hidden folder next to `beside` (same file system, so its files can be renamed into place), removed
    with whatever is left in it when the block ends, normally or not. Tools fill it, then move or rename the
    results into place: an interrupted run leaves nothing half-written among the user's files."""
    beside = Path(beside)
    try:
        beside.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{beside.name}.", suffix=".tmp", dir=beside.parent))
    except OSError as e:
        raise UserError(f"{beside}: cannot write next to it ({e.strerror}); choose another output folder") from None
    folder.chmod(0o777 & ~_UMASK)  # mkdtemp makes 0700 folders; a folder renamed into place gets the usual mode
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def publish_folder(scratch: Path, target: Path) -> None:
    """Rename a filled scratch folder to `target`, which must not exist or be an empty folder. An empty folder
    reached through a symbolic link stays where the link points: the files move into it."""
    if target.is_symlink() and target.is_dir():
        for f in scratch.iterdir():
            shutil.move(f, target.resolve() / f.name)  # maybe another file system
        return
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    scratch.rename(target)


def output_folder(path: Path, flag: str) -> Path:
    """Create an output folder (and its parents) and prove it writable, or say which flag to change."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder; choose a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write there ({e.strerror}); choose another folder") from None
    return path


def output_file(path: Path, flag: str) -> Path:
    """Check, before any work, that a file can be written at `path` (its folder is created)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    output_folder(path.parent, flag)
    return path


def read_json(path: Path, fix: str, kind: type = dict):
    """A JSON object (or `kind`) a tool wrote, or one error line where it is cut short (a run still writing it, an
    interrupted copy), damaged or of another shape, ending with `fix`."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not text; {fix}") from None
    except ValueError as e:
        raise UserError(f"{path}: not complete JSON ({e}): cut short or damaged; {fix}") from None
    if not isinstance(data, kind):
        raise UserError(f"{path}: holds JSON, but not what segkit writes there; {fix}")
    return data


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (UTF-8)."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_image(path: Path, image: np.ndarray, compression: str | None = "zlib", extratags: list | None = None,
                atomic: bool = True) -> None:
    """Write an (H, W) or (H, W, C) array; TIFF keeps any dtype and band count (Deflate by default) and takes extra
    tags (e.g. GeoTIFF georeferencing) as tifffile's (code, dtype, count, value, writeonce).

    atomic: through a temporary file and a rename. Tools that fill a scratch folder renamed into place as a whole
    pass False: the per-file fsync cost them about a fifth of their writing time and protected nothing more.
    """
    path = Path(path)
    if not atomic:
        _encode(path, path, image, compression, extratags)
        return
    with atomic_output(path) as tmp:
        _encode(path, tmp, image, compression, extratags)


def _encode(path: Path, target: Path, image: np.ndarray, compression: str | None, extratags: list | None) -> None:
    """Encode image in the format path's extension names, into target."""
    if path.suffix.lower() in TIFF_EXTENSIONS:
        rgb = image.ndim == 3 and image.shape[2] == 3
        tifffile.imwrite(target, image, photometric="rgb" if rgb else "minisblack", planarconfig="contig",
                         compression=compression, extratags=extratags or ())
        return
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA)
    ok, buf = cv2.imencode(path.suffix, image)
    if not ok:
        raise UserError(f"{path}: OpenCV cannot write {image.dtype} with {image.shape} as {path.suffix}; "
                        "use a .tif output")
    try:
        buf.tofile(target)
    except OSError as e:
        raise as_disk_error(path, e) from None
