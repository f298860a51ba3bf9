"""Cut a large image (and its mask and extra band rasters) into training tiles.

  python dataset_utils/split_big_image_to_tiles.py --image scene.tif --mask scene_mask.tif -o tiles \\
      --tile-size 256 --overlap 64 --band nir=scene_nir.tif --skip-empty

Writes OUT/images, OUT/gt and OUT/<band> tiles named <scene>_r<row>_c<col> (the tile's top-left pixel), and
OUT/manifest.json (source, full size, tile positions, georeferencing) for stitch_tiles.py. Any band count and
dtype; TIFFs are read window by window, so memory stays far below the image size for tiled or striped TIFFs;
GeoTIFF georeferencing is carried to every tile.
"""
import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from cli import Parser, at_least, progress
from dataset import check_band_names
from errors import UserError, run_cli
from fileio import TIFF_EXTENSIONS, is_image_file, output_folder, read_json, scratch_folder, write_image, write_text
from raster import RasterReader, check_size, extratags, nodata_pixels, shifted_geo, tile_starts

TILE_NAME = "{stem}_r{y:04d}_c{x:04d}"


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__)
    p.add_argument("--image", required=True, help="the large image (any band count; TIFF, PNG, JPG)")
    p.add_argument("--mask", help="its label raster, same size (tiles go to gt/)")
    p.add_argument("--band", action="append", default=[], metavar="NAME=PATH",
                   help="an extra one-band raster, same size, tiles go to NAME/ (repeatable), e.g. nir=scene_nir.tif")
    p.add_argument("-o", "--output-dir", required=True, help="dataset folder to write images/, gt/, <band>/ into")
    p.add_argument("--tile-size", type=at_least(16), default=256, help="tile side in pixels (256)")
    p.add_argument("--overlap", type=at_least(0, float), default=0,
                   help="overlap of neighbouring tiles: pixels, or a fraction of the tile below 1 (0)")
    p.add_argument("--edge", choices=["shift", "pad"], default="shift",
                   help="last tile of a row/column: shift it inward to end at the border (all pixels real), or "
                        "pad it past the border with --pad-value and mask 0 (shift)")
    p.add_argument("--pad-value", type=float, default=0, help="image value of padded pixels (0)")
    p.add_argument("--skip-empty", action="store_true", help="skip tiles whose mask has no foreground (no value > 0)")
    p.add_argument("--nodata", type=float, default=None,
                   help="image value meaning 'no data' (all bands equal to it); nan for NaN pixels")
    p.add_argument("--max-nodata", type=at_least(0, float), default=0.5,
                   help="with --nodata: skip tiles with more than this share of nodata pixels (0.5)")
    p.add_argument("--format", choices=["auto", "tif", "png"], default="auto",
                   help="tile files: auto keeps each raster's own kind (TIFF stays TIFF, others become PNG)")
    p.add_argument("--overwrite", action="store_true", help="replace tiles of this scene already in OUT")
    return p


def tile_kind(path: Path, fmt: str, dtype, bands: int) -> str:
    if fmt == "tif" or (fmt == "auto" and path.suffix.lower() in TIFF_EXTENSIONS):
        return ".tif"
    if dtype not in (np.uint8, np.uint16) or bands > 4:
        raise UserError(f"{path}: {bands} band(s) of {dtype} do not fit in PNG tiles; use --format tif")
    return ".png"


def open_rasters(args: argparse.Namespace) -> dict[str, RasterReader]:
    """The image, mask and band rasters by output folder name, checked to be of one size."""
    image = RasterReader(Path(args.image))
    rasters = {"images": image}
    if args.mask:
        rasters["gt"] = RasterReader(Path(args.mask))
        check_size(rasters["gt"], image, "mask")
    for spec in args.band:
        name, sep, path = spec.partition("=")
        if not sep or not name or name in rasters:
            raise UserError(f"--band {spec}: expected NAME=PATH with a new folder name, e.g. --band nir=nir.tif")
        check_band_names([name], "--band")
        rasters[name] = RasterReader(Path(path))
        check_size(rasters[name], image, f"band {name}")
    return rasters


def tile_grid(args: argparse.Namespace, image: RasterReader) -> tuple[int, list[int], list[int]]:
    """(overlap in pixels, tile rows, tile columns), or a UserError naming the flag to change."""
    tile = args.tile_size
    overlap = round(args.overlap * tile) if 0 < args.overlap < 1 else int(args.overlap)
    if tile < 16 or tile % 2:
        raise UserError(f"--tile-size {tile} must be an even number of at least 16 pixels")
    if not 0 <= overlap < tile:
        raise UserError(f"--overlap {args.overlap} gives {overlap} px, which must be below --tile-size {tile}")
    if args.edge == "shift" and (image.height < tile or image.width < tile):
        raise UserError(f"--tile-size {tile} is larger than {image.path} ({image.width}x{image.height}); use "
                        f"--tile-size {max(16, min(image.height, image.width) // 2 * 2)} or less, or --edge pad")
    return (overlap, tile_starts(image.height, tile, tile - overlap, args.edge),
            tile_starts(image.width, tile, tile - overlap, args.edge))


def write_tiles(args: argparse.Namespace, rasters: dict, kinds: dict, ys: list[int], xs: list[int], into: Path
                ) -> tuple[list, dict]:
    """Every kept tile of every raster into `into`/<folder>/; (kept tile positions, skipped counts by reason)."""
    image, tile, stem = rasters["images"], args.tile_size, rasters["images"].path.stem
    kept, skipped = [], {"empty": 0, "nodata": 0}
    for folder in rasters:
        (into / folder).mkdir()
    for y, x in progress([(y, x) for y in ys for x in xs], desc=f"tiling {stem}", unit="tile"):
        h, w = min(tile, image.height - y), min(tile, image.width - x)
        windows = {name: r.read(y, x, h, w) for name, r in rasters.items()}
        if args.skip_empty and not (windows["gt"] > 0).any():
            skipped["empty"] += 1
            continue
        if args.nodata is not None and nodata_pixels(windows["images"], args.nodata).mean() > args.max_nodata:
            skipped["nodata"] += 1
            continue
        name = TILE_NAME.format(stem=stem, y=y, x=x)
        for folder, data in windows.items():
            if (h, w) != (tile, tile):  # --edge pad
                pad = ((0, tile - h), (0, tile - w)) + ((0, 0),) * (data.ndim - 2)
                data = np.pad(data, pad, constant_values=0 if folder == "gt" else args.pad_value)
            geo = rasters[folder].geo
            write_image(into / folder / f"{name}{kinds[folder]}", data, atomic=False,  # scratch folder
                        extratags=extratags(shifted_geo(geo, y, x)) if geo and kinds[folder] == ".tif" else None)
        kept.append([y, x])
    return kept, skipped


def split(args: argparse.Namespace) -> dict:
    """Tile one scene; returns its manifest entry."""
    rasters = open_rasters(args)
    image, stem, tile = rasters["images"], rasters["images"].path.stem, args.tile_size
    overlap, ys, xs = tile_grid(args, image)
    if args.skip_empty and "gt" not in rasters:
        raise UserError("--skip-empty needs --mask")
    kinds = {name: tile_kind(r.path, args.format, r.dtype, r.bands) for name, r in rasters.items()}
    out = output_folder(Path(args.output_dir), "-o")
    manifest = read_manifest(out / "manifest.json")  # another tool's is refused now, not after the tiling
    # Only the tiles an earlier tiling of this scene wrote: a user's own file beside them (a hand-corrected mask
    # saved as <tile>_fixed.png) is never replaced.
    tile_name = re.compile(re.escape(stem) + r"_r\d{4,}_c\d{4,}")
    existing = [p for name in rasters if (out / name).is_dir() for p in (out / name).iterdir()
                if is_image_file(p) and tile_name.fullmatch(p.stem)]
    if existing and not args.overwrite:
        raise UserError(f"{out} already holds {len(existing)} tile(s) of {stem} (e.g. {existing[0]}); remove them or "
                        "pass --overwrite")
    try:
        with scratch_folder(out / f"tiling-{stem}") as scratch:
            kept, skipped = write_tiles(args, rasters, kinds, ys, xs, scratch)
            for p in existing:  # --overwrite: an earlier tiling of this scene goes first
                p.unlink()
            for folder in rasters:  # the scene's tiles appear in OUT only once all are written
                (out / folder).mkdir(exist_ok=True)
                for f in (scratch / folder).iterdir():
                    f.replace(out / folder / f.name)
    finally:
        for r in rasters.values():
            r.close()
    entry = {"image": str(image.path), "height": image.height, "width": image.width, "bands": image.bands,
             "dtype": str(np.dtype(image.dtype)), "tile_size": tile, "overlap": overlap, "edge": args.edge,
             "folders": kinds, "geo": {str(k): v for k, v in image.geo.items()}, "tiles": kept}
    manifest["sources"][stem] = entry
    write_text(out / "manifest.json", json.dumps(manifest, indent=1))
    print(f"{image.path.name} ({image.width}x{image.height}, {image.bands} band(s) {np.dtype(image.dtype)}): "
          f"{len(kept)} of {len(ys) * len(xs)} tiles of {tile} px, overlap {overlap} px, written to {out} "
          f"({', '.join(rasters)})" + "".join(f"; {n} skipped ({why})" for why, n in skipped.items() if n))
    if image.geo.get(42113) and args.nodata is None:
        print(f"note: the image declares nodata {image.geo[42113]['value']}; pass --nodata to skip empty tiles")
    return entry


def read_manifest(path: Path) -> dict:
    """The output folder's manifest.json: the tilings so far, {"sources": {scene: entry}}."""
    fix = "it is not the tiler's: tile into another -o folder, or move that manifest.json away"
    data = read_json(path, fix) if path.exists() else {"sources": {}}
    if not isinstance(data.get("sources"), dict):
        raise UserError(f"{path}: a manifest.json without the tiler's 'sources' (another tool's?); {fix}")
    return data


def main() -> int:
    split(get_args_parser().parse_args())
    return 0


if __name__ == "__main__":
    run_cli(main)
