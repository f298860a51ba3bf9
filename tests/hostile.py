"""Hostile files, built byte by byte: small files that declare enormous images, and files whose parts disagree."""
import struct
import zlib


def tiff_bomb(width: int, height: int, samples: int = 3, tile: int = 1024, rows_held: int | None = None,
              bits: int = 8) -> bytes:
    """A tiled, Deflate TIFF of a few KB that declares width x height pixels of `bits` bit samples: every tile points
    at one compressed block of zeros. rows_held: declare the size but hold tiles for only that many rows (a damaged
    file)."""
    block = zlib.compress(bytes(tile * tile * samples * bits // 8), 9)
    across, down = -(-width // tile), -(-(rows_held or height) // tile)
    n = across * down
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, samples, None), (259, 3, 1, 8),
               (262, 3, 1, 2 if samples == 3 else 1), (277, 3, 1, samples), (284, 3, 1, 1), (322, 4, 1, tile),
               (323, 4, 1, tile), (324, 4, n, None), (325, 4, n, None)]
    ifd_size = 2 + 12 * len(entries) + 4
    data_at = 8 + ifd_size
    arrays = {258: struct.pack(f"<{samples}H", *[bits] * samples), 325: struct.pack(f"<{n}I", *[len(block)] * n)}
    block_at = data_at + sum(len(a) for a in arrays.values()) + 4 * n
    arrays[324] = struct.pack(f"<{n}I", *[block_at] * n)
    out, extra, pos = [b"II*\x00", struct.pack("<I", 8), struct.pack("<H", len(entries))], [], data_at
    for code, kind, count, value in entries:
        payload = arrays.get(code)
        if payload is not None and len(payload) > 4:
            out.append(struct.pack("<HHII", code, kind, count, pos))
            extra.append(payload)
            pos += len(payload)
        else:
            packed = payload if payload is not None else struct.pack("<I" if kind == 4 else "<H", value)
            out.append(struct.pack("<HHI", code, kind, count) + packed.ljust(4, b"\x00"))
    return b"".join(out) + struct.pack("<I", 0) + b"".join(extra) + block


def png_bomb(width: int, height: int) -> bytes:
    """A PNG of about 2 KB that declares width x height RGB pixels (its few rows of zeros compress to nothing)."""
    rows = zlib.compress(b"".join(b"\x00" + bytes(width * 3) for _ in range(4)), 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) \
        + _chunk(b"IDAT", rows) + _chunk(b"IEND", b"")


def png_lying_chunk(claimed: int = 2 ** 31 - 1) -> bytes:
    """A 3 KB grey PNG with a text chunk whose length field claims `claimed` bytes."""
    rows = zlib.compress(b"".join(b"\x00" + bytes(64) for _ in range(64)))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 8, 0, 0, 0, 0)) \
        + struct.pack(">I", claimed) + b"tEXt" + b"x" * 3000 + _chunk(b"IDAT", rows) + _chunk(b"IEND", b"")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
