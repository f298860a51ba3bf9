"""Stitch tiles back into the rasters they were cut from (the inverse of split_big_image_to_tiles.py).

  python dataset_utils/stitch_tiles.py tiles/images -o scene.tif
  python dataset_utils/stitch_tiles.py predictions/masks -o stitched/ --manifest tiles/manifest.json

Tiles are grouped by scene from their names (<scene>_r<row>_c<col>); each scene gets its original size from the
manifest (found next to the tiles or given with --manifest), else from the tiles' extent. Where tiles overlap,
values are averaged (images, probabilities) or taken from the tile whose centre is nearest (label masks: integer,
one band), so tiles cut from a raster rebuild it bit for bit. GeoTIFF georeferencing from the manifest is restored.
"""
import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from cli import Parser, progress
from errors import UserError, note, run_cli
from fileio import IMAGE_EXTENSIONS, TIFF_EXTENSIONS, is_image_file, output_folder, read_image, read_json, write_image
from raster import extratags

NAME = re.compile(r"^(?P<scene>.+)_r(?P<y>\d+)_c(?P<x>\d+)$")


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__)
    p.add_argument("tiles", help="folder of tiles named <scene>_r<row>_c<col>.<ext>")
    p.add_argument("-o", "--output", required=True,
                   help="output raster (one scene) or folder (one raster per scene, named after it)")
    p.add_argument("--manifest", help="manifest.json of the tiling (default: next to the tiles or one folder up)")
    p.add_argument("--blend", choices=["auto", "mean", "center"], default="auto",
                   help="overlaps: mean of the tiles, or the tile whose centre is nearest; auto: center for label "
                        "masks (integer, one band), mean otherwise")
    p.add_argument("--overwrite", action="store_true", help="replace output rasters that already exist")
    return p


def find_manifest(tiles: Path, given: str | None) -> dict:
    """The tiler's manifest: the scenes' sizes and georeference. One found beside the tiles that another tool
    wrote is passed over with a note; one given with --manifest must be the tiler's."""
    if given:
        path = Path(given)
        if not path.is_file():
            raise UserError(f"--manifest {path}: file not found")
    else:
        path = next((p for p in (tiles / "manifest.json", tiles.parent / "manifest.json") if p.is_file()), None)
    if path is None:
        return {}
    data = read_json(path, "give the tiler's manifest with --manifest", (dict, list))
    sources = data.get("sources") if isinstance(data, dict) else None
    if isinstance(sources, dict) and all(isinstance(v, dict) for v in sources.values()):
        return sources
    if given:
        raise UserError(f"--manifest {path}: not a manifest of split_big_image_to_tiles.py (no 'sources')")
    note(f"{path} is not a manifest of split_big_image_to_tiles.py (another tool's?); scene sizes come from the tiles")
    return {}


def stitch_scene(tiles: list[tuple[int, int, Path]], height: int | None, width: int | None, blend: str
                 ) -> np.ndarray:
    first = read_image(tiles[0][2])
    if height is None:  # no manifest: the extent of the tiles
        height = max(y + first.shape[0] for y, _, _ in tiles)
        width = max(x + first.shape[1] for _, x, _ in tiles)
        if height * width > 16 * len(tiles) * first.shape[0] * first.shape[1]:  # a few tiles spread over a vast area
            y, x, far = max(tiles, key=lambda t: t[0] + t[1])
            raise UserError(f"{far}: its name puts it at row {y}, column {x}, so {len(tiles)} tile(s) would make a "
                            f"{width} x {height} px scene, mostly empty; is it a tile of this scene? move or rename "
                            "it, or give the tiling's --manifest")
    labels = first.ndim == 2 and first.dtype.kind in "ui"
    mode = ("center" if labels else "mean") if blend == "auto" else blend
    out = np.zeros((height, width, *first.shape[2:]), first.dtype)
    if mode == "mean":
        total = np.zeros(out.shape, np.float64)
        count = np.zeros((height, width), np.uint16)
    else:
        best = np.full((height, width), -1.0, np.float32)  # distance-to-centre score of the tile pasted so far
    for y, x, path in progress(tiles, desc="stitching", unit="tile", leave=False):
        tile = read_image(path)
        if tile.shape[2:] != first.shape[2:] or tile.dtype != first.dtype:
            raise UserError(f"{path}: {tile.dtype} with shape {tile.shape} differs from the scene's first tile "
                            f"{tiles[0][2]} ({first.dtype}, {first.shape}); tiles of a scene must match")
        h, w = min(tile.shape[0], height - y), min(tile.shape[1], width - x)
        if h <= 0 or w <= 0:
            raise UserError(f"{path}: tile at row {y}, column {x} lies outside the {width}x{height} raster")
        tile = tile[:h, :w]
        if mode == "mean":
            total[y:y + h, x:x + w] += tile
            count[y:y + h, x:x + w] += 1
        else:
            ry = 1 - np.abs(np.arange(h) - (tile.shape[0] - 1) / 2) / tile.shape[0]
            rx = 1 - np.abs(np.arange(w) - (tile.shape[1] - 1) / 2) / tile.shape[1]
            score = (ry[:, None] * rx[None, :]).astype(np.float32)  # higher nearer the tile's centre
            win = score > best[y:y + h, x:x + w]
            out[y:y + h, x:x + w][win] = tile[win]
            best[y:y + h, x:x + w][win] = score[win]
    covered = count > 0 if mode == "mean" else best >= 0
    if not covered.all():
        print(f"note: {int((~covered).sum())} pixels are covered by no tile (skipped tiles?) and are 0")
    if mode == "mean":
        mean = total / np.maximum(count, 1).reshape(count.shape + (1,) * (total.ndim - 2))
        out = (np.rint(mean) if out.dtype.kind in "ui" else mean).astype(out.dtype)
    return out


def stitch(args: argparse.Namespace) -> list[Path]:
    folder = Path(args.tiles)
    if not folder.is_dir():
        raise UserError(f"{folder}: tile folder not found")
    scenes: dict[str, list] = defaultdict(list)
    for p in sorted(folder.iterdir()):
        m = NAME.match(p.stem)
        if is_image_file(p) and m:
            scenes[m["scene"]].append((int(m["y"]), int(m["x"]), p))
    if not scenes:
        raise UserError(f"{folder} holds no tiles named <scene>_r<row>_c<col>.<ext> (as split_big_image_to_tiles.py "
                        "writes them)")
    manifest = find_manifest(folder, args.manifest)
    out = Path(args.output)
    single = out.suffix.lower() in IMAGE_EXTENSIONS
    if single and len(scenes) > 1:
        raise UserError(f"{folder} holds tiles of {len(scenes)} scenes ({', '.join(list(scenes)[:4])}); give a "
                        "folder as -o to get one raster per scene")
    targets = {scene: out if single else out / f"{scene}{tiles[0][2].suffix}" for scene, tiles in scenes.items()}
    taken = [t for t in targets.values() if t.exists()]
    if taken and not args.overwrite:
        raise UserError(f"{taken[0]} already exists; pass --overwrite to replace it, or choose another -o")
    output_folder(out.parent if single else out, "-o")
    written = []
    for scene, tiles in scenes.items():
        info, target = manifest.get(scene, {}), targets[scene]
        raster = stitch_scene(tiles, info.get("height"), info.get("width"), args.blend)
        geo = info.get("geo")
        write_image(target, raster, extratags=extratags(geo) if geo and target.suffix.lower() in TIFF_EXTENSIONS
                    else None)
        written.append(target)
        print(f"{scene}: {len(tiles)} tiles -> {target} ({raster.shape[1]}x{raster.shape[0]}, {raster.dtype}"
              + ("" if info else ", size from the tiles: no manifest") + ")")
    return written


def main() -> int:
    stitch(get_args_parser().parse_args())
    return 0


if __name__ == "__main__":
    run_cli(main)
