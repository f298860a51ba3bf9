"""Predict masks for new images with a trained model: a checkpoint, an experiment folder or an exported bundle.

  python predict.py -m logs/my_exp -i new_images/ -o masks/
  python predict.py -m bundle/ -i scenes.txt -o masks/ --prob uint8 --overlay       # onnxruntime, no torch
  python predict.py -m logs/my_exp/best.pth -i scene.tif -o out/ --band nir=scene_nir.tif

INPUT is an image, a folder of images or a text file listing image paths (one per line, relative to the file).
The model's extra bands (e.g. nir) are found by name beside the images' folder, as in training (<data>/images/a.tif
with <data>/nir/a.tif), or given with --band NAME=FILE_OR_FOLDER. Each image gets one mask named like it (same
stem) in the dataset's label values, at its size: GeoTIFF in, GeoTIFF out (georeference and nodata kept), else PNG.
Rasters larger than the tile are read in windows, streamed through the model and written tile by tile, so a scene
of any size is predicted in bounded memory.
"""
import argparse
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cli import Parser
from errors import UserError, run_cli
from fileio import TIFF_EXTENSIONS, dead_link, is_image_file, output_folder, read_list, write_image
from inference import Predictor, add_prediction_flags
from raster import RasterReader, TiledTiffWriter, check_size, extratags, nodata_pixels, tiff_header

OVERLAY_SIDE = 2048  # overlays of larger images are shrunk to this side
READ_CACHE_MB = 16  # decoded TIFF segments kept per raster; decoding again costs little beside the model
CPU_TILE, CPU_PIXELS = 384, 2 ** 18  # CPU defaults: largest tile, pixels per forward pass (bench/RESULTS.md)
SCENE_BYTES = 16 * 2 ** 20  # inputs from this file size on are checked before any prediction


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("-m", "--model", required=True,
                   help="best.pth / last.pth, an experiment folder (its best.pth) or a bundle folder from export.py")
    g.add_argument("-i", "--input", required=True, help="an image, a folder of images or a .txt list of images")
    g.add_argument("-o", "--output-dir", required=True, help="folder for the masks (created)")
    g.add_argument("--band", action="append", default=[], metavar="NAME=PATH",
                   help="where the model's extra band NAME is: a folder (files named like the images) or, for one "
                        "input image, a file (default: the folder NAME beside the images' folder)")
    again = g.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true", help="replace masks already in --output-dir")
    again.add_argument("--skip-existing", action="store_true",
                       help="predict only the inputs whose outputs are not all in --output-dir yet, e.g. to finish a "
                            "stopped run (an input with some of its outputs is predicted again)")
    g = p.add_argument_group("prediction")
    add_prediction_flags(g, "the model's, at most 384 on the CPU", None,
                         "default: a quarter megapixel on the CPU, 16 on a GPU; images smaller than a tile go "
                         "several to a pass, in the pixels of -b tiles")
    g.add_argument("--nodata", type=float, default=None,
                   help="input pixel value (in every band) that means no data (default: the GeoTIFF's GDAL_NODATA)")
    g = p.add_argument_group("output")
    g.add_argument("--prob", choices=["uint8", "float16"], default=None,
                   help="also write probabilities as <stem>_prob.tif (binary: foreground; else one band per class)")
    g.add_argument("--overlay", action="store_true", help="also write <stem>_overlay.jpg: the mask over the image")
    g = p.add_argument_group("runtime")
    g.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    g.add_argument("--device", default=None, help="device for checkpoints: 0, cuda:1, mps, cpu")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="mixed precision for checkpoints on a GPU (auto: bf16/fp16)")
    return p


# ----------------------------------------------------------------------------------------------------- inputs
@dataclass
class Job:
    image: Path
    bands: list[Path]
    mask: Path  # output paths
    prob: Path
    overlay: Path


def list_images(path: Path) -> list[Path]:
    """-i as a list of image files."""
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if is_image_file(p))
        if not images:
            below = sorted((d for d in [*path.glob("*/"), *path.glob("*/*/")] if d.is_dir()
                            and any(is_image_file(p) for p in d.iterdir())), key=lambda d: (d.name != "images", d))
            hint = f"; image folders below it: {', '.join(map(str, below[:3]))}: pass one, e.g. -i {below[0]}" \
                if below else ""
            raise UserError(f"-i {path}: no image files in this folder{hint}")
        return check_links(images)
    if path.suffix.lower() == ".txt" and path.is_file():
        images = [(path.parent / s).resolve() if not Path(s).is_absolute() else Path(s) for s in read_list(path, "-i")]
        missing = [str(p) for p in images if not is_image_file(p)]
        if missing:
            raise UserError(f"-i {path}: {len(missing)} listed file(s) are not images or do not exist, e.g. "
                            f"{missing[0]}")
        if not images:
            raise UserError(f"-i {path}: the list is empty")
        return check_links(images)
    if is_image_file(path):
        return check_links([path])
    raise UserError(f"-i {path}: not found, or not an image, a folder or a .txt list")


def check_links(paths: list[Path]) -> list[Path]:
    """The paths, once none is a link to nothing (a drive not mounted, a git-annex file not fetched)."""
    dead = [p for p in paths if not p.exists()]
    if dead:
        raise dead_link(dead[0], len(dead) - 1)
    return paths


def band_sources(specs: list[str], names: list[str], single: bool) -> dict[str, Path]:
    """--band NAME=PATH flags, checked against the model's bands."""
    given = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--band {spec}: write it as NAME=PATH, e.g. --band nir=scenes/nir")
        if name not in names:
            raise UserError(f"--band {name}: the model has no band {name!r} (its bands: {', '.join(names) or 'none'})")
        if not Path(path).exists():
            raise UserError(f"--band {spec}: {path} not found")
        if Path(path).is_file() and not single:
            raise UserError(f"--band {spec}: a file serves one input image; give a folder for several")
        given[name] = Path(path)
    return given


def find_band(image: Path, name: str, given: dict[str, Path]) -> Path:
    source = given.get(name, image.parent.parent / name)
    if source.is_file():
        return source
    hits = [p for p in source.glob(f"{glob_escape(image.stem)}.*") if is_image_file(p)] if source.is_dir() else []
    if len(hits) != 1:
        why = "several files" if hits else "no file"
        raise UserError(f"{image}: {why} named {image.stem}.* for the model's band {name!r} in {source}; put it "
                        f"there or give --band {name}=PATH")
    return check_links(hits)[0]


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def plan_jobs(args: argparse.Namespace, band_names: list[str], out: Path) -> list[Job]:
    """Every input with its bands and outputs; clashing or existing outputs stop the run before any work."""
    images = list_images(Path(args.input))
    given = band_sources(args.band, band_names, len(images) == 1)
    jobs, seen = [], {}
    for image in images:
        ext = ".tif" if image.suffix.lower() in TIFF_EXTENSIONS else ".png"
        job = Job(image, [find_band(image, n, given) for n in band_names], out / f"{image.stem}{ext}",
                  out / f"{image.stem}_prob.tif", out / f"{image.stem}_overlay.jpg")
        if job.mask.name in seen:
            raise UserError(f"{image} and {seen[job.mask.name]} would both write {job.mask}; predict them into "
                            "separate -o folders")
        seen[job.mask.name] = image
        jobs.append(job)
    outputs = [p for j in jobs for p in job_outputs(j, args)]
    if any(p.resolve() in {j.image.resolve(), *map(Path.resolve, j.bands)} for j in jobs for p in outputs):
        raise UserError(f"-o {out}: the masks would replace input images; choose another folder")
    existing = [p for p in outputs if p.exists()]
    if existing and not args.overwrite and not args.skip_existing:
        raise UserError(f"-o {out}: {len(existing)} output file(s) exist already, e.g. {existing[0].name}; add "
                        "--skip-existing to predict only the inputs without them (to finish a stopped run), "
                        "--overwrite to replace them, or choose another folder")
    if args.skip_existing:
        todo = [j for j in jobs if not all(p.exists() for p in job_outputs(j, args))]
        print(f"skipping {len(jobs) - len(todo)} of {len(jobs)} input(s): their outputs are in {out} already")
        return todo
    return jobs


def job_outputs(job: Job, args: argparse.Namespace) -> list[Path]:
    """The files an input's prediction writes with these flags."""
    return [job.mask, *([job.prob] if args.prob else []), *([job.overlay] if args.overlay else [])]


# ----------------------------------------------------------------------------------------------------- scenes
class Scene:
    """One input image with its extra bands as (H, W, C) windows."""

    def __init__(self, job: Job, nodata: float | None):
        self.readers = [RasterReader(job.image, READ_CACHE_MB)] + [RasterReader(b, READ_CACHE_MB) for b in job.bands]
        try:
            self.channels, self.dtype = stack_layout(job, self.readers)
        except UserError:
            self.close()
            raise
        first = self.readers[0]
        self.height, self.width, self.geo = first.height, first.width, first.geo
        tag = self.geo.get(42113, {}).get("value")
        self.nodata = nodata if nodata is not None else float(str(tag).strip("\x00 ")) if tag else None

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        parts = [r.read(y, x, h, w) for r in self.readers]
        parts = [p[..., None] if p.ndim == 2 else p for p in parts]
        return np.concatenate(parts, 2).astype(self.dtype, copy=False) if len(parts) > 1 else parts[0]

    def close(self) -> None:
        for r in self.readers:
            r.close()


def stack_layout(job: Job, parts: list) -> tuple[int, np.dtype]:
    """Channels and pixel type of an input stacked with its extra bands (RasterReaders or TiffHeaders); bands that
    do not fit the image raise."""
    for part, name in zip(parts[1:], job.bands, strict=True):
        check_size(part, parts[0], f"band {name.parent.name}")
        if part.bands != 1:
            raise UserError(f"{part.path}: an extra band must have one channel, this one has {part.bands}")
    dtypes = {np.dtype(p.dtype) for p in parts}
    return sum(p.bands for p in parts), dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float32)


def check_scenes(predictor: Predictor, jobs: list[Job]) -> None:
    """Large TIFF inputs checked against the model from their tags before any prediction, so a mistake in the
    last scene stops the run now, not hours in. Small images are checked as they come: there a mistake costs
    little, and --skip-existing resumes after it."""
    for job in jobs:
        if job.image.stat().st_size < SCENE_BYTES:
            continue
        parts = [tiff_header(p) for p in (job.image, *job.bands)]
        if None not in parts:
            channels, dtype = stack_layout(job, parts)
            problem = predictor.input_problem(str(job.image), channels, str(dtype))
            if problem:
                raise UserError(problem)


def model_input(image: np.ndarray, nodata: float | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The window as the model takes it (NaN set to 0) and its nodata pixels (None: none)."""
    missing = nodata_pixels(image, nodata) if nodata is not None else None
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        missing = ~np.isfinite(image).all(axis=2) | (missing if missing is not None else False)
        image = np.nan_to_num(image, nan=0.0, posinf=0.0, neginf=0.0)
    return image, (missing if missing is not None and missing.any() else None)


# ----------------------------------------------------------------------------------------------------- outputs
class Outputs:
    """The mask (and probabilities) of one scene, written as bands of rows arrive: tile by tile into a TIFF, or
    gathered for a PNG; a shrunk copy of image and mask for the overlay."""

    def __init__(self, job: Job, scene: Scene, predictor: Predictor, args: argparse.Namespace):
        values = predictor.meta.labels.label_values()
        self.lut = values.astype(np.uint8 if values.max() <= 255 else np.uint16)
        free = sorted(set(range(np.iinfo(self.lut.dtype).max + 1)) - set(values.tolist()))
        self.fill = free[-1]  # the mask value of nodata pixels: the largest value no class uses
        self.job, self.scene, self.predictor, self.args = job, scene, predictor, args
        self.tiff = job.mask.suffix == ".tif"
        self.step = max(1, -(-max(scene.height, scene.width) // OVERLAY_SIDE))
        self.thumb_image, self.thumb_mask, self.missing = [], [], 0
        georef = {c: t for c, t in scene.geo.items() if c != 42113} if self.tiff else {}  # the input's nodata: not ours
        nodata = {42113: {"dtype": 2, "count": len(str(self.fill)) + 1, "value": str(self.fill)}} \
            if self.tiff and scene.nodata is not None else {}
        self.mask = TiledTiffWriter(job.mask, scene.height, scene.width, 1, self.lut.dtype,
                                    extratags=extratags({**georef, **nodata})) if self.tiff else None
        self.rows: list[np.ndarray] = []
        self.prob = TiledTiffWriter(job.prob, scene.height, scene.width, predictor.meta.out_channels, args.prob,
                                    extratags=extratags(georef)) if args.prob else None

    def __enter__(self) -> "Outputs":
        for w in (self.mask, self.prob):
            if w is not None:
                w.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for w in (self.mask, self.prob):
            if w is not None:
                w.__exit__(*exc)
        if exc[0] is None:
            self.finish()

    def add(self, y0: int, image: np.ndarray, probs: np.ndarray, missing: np.ndarray | None) -> None:
        """Rows y0.. of the scene: the input window, its (K, h, W) probabilities and nodata pixels."""
        classes = self.predictor.classes(probs[None])[0]
        mask = self.lut[classes]
        if missing is not None:
            mask[missing] = self.fill
            self.missing += int(missing.sum())
        if self.mask is not None:
            self.mask.write(mask)
        else:
            self.rows.append(mask)
        if self.prob is not None:
            p = np.moveaxis(probs, 0, -1)
            p = np.rint(p * 255).astype(np.uint8) if self.args.prob == "uint8" else p.astype(np.float16)
            if missing is not None:
                p[missing] = 0 if self.args.prob == "uint8" else np.nan
            self.prob.write(p[..., 0] if p.shape[-1] == 1 else p)
        if self.args.overlay:
            keep = [i for i in range(len(mask)) if (y0 + i) % self.step == 0]
            self.thumb_image.append(image[keep, ::self.step])
            self.thumb_mask.append(classes[keep, ::self.step].astype(np.uint8))

    def finish(self) -> None:
        if self.mask is None:
            write_image(self.job.mask, np.concatenate(self.rows))
        if self.args.overlay:
            import visualize

            rgb = visualize.to_rgb8(np.concatenate(self.thumb_image))
            pic = visualize.overlay(rgb, np.concatenate(self.thumb_mask), self.predictor.meta.labels.num_classes)
            write_image(self.job.overlay, pic)


# ----------------------------------------------------------------------------------------------------- predicting
def open_scene(predictor: Predictor, job: Job, args: argparse.Namespace) -> Scene:
    scene = Scene(job, args.nodata)
    problem = predictor.input_problem(str(job.image), scene.channels, str(scene.dtype))
    if problem:
        scene.close()
        raise UserError(problem)
    return scene


def predict_jobs(predictor: Predictor, jobs: list[Job], args: argparse.Namespace) -> Iterator[tuple[int, int]]:
    """(pixels, nodata pixels) of each input in turn. Inputs that go through the model whole are predicted in
    batches of one size across files (one small image per forward pass would leave a GPU idle); larger ones
    stream through the sliding window."""
    batch: list[tuple[Job, Scene, np.ndarray, np.ndarray | None]] = []
    for job in jobs:
        try:
            scene = open_scene(predictor, job, args)
            whole = predictor.whole(scene.height, scene.width)
            if whole:
                with contextlib.closing(scene):
                    image, missing = model_input(scene.read(0, 0, scene.height, scene.width), scene.nodata)
        except Exception:
            yield from predict_whole(predictor, batch, args)  # the inputs before a refused one still get masks
            raise
        if not whole:
            yield from predict_whole(predictor, batch, args)
            batch = []
            yield predict_scene(predictor, job, args, scene)
            continue
        if batch and (image.shape != batch[0][2].shape or image.dtype != batch[0][2].dtype
                      or len(batch) == predictor.images_per_pass(scene.height, scene.width)):
            yield from predict_whole(predictor, batch, args)
            batch = []
        batch.append((job, scene, image, missing))
    yield from predict_whole(predictor, batch, args)


def predict_whole(predictor: Predictor, batch: list, args: argparse.Namespace) -> Iterator[tuple[int, int]]:
    """Images of one size and type, (job, closed scene, image, nodata pixels), in one forward pass."""
    if not batch:
        return
    r = predictor.runner
    logits = predictor.logits(r.asarray(np.stack([image for _, _, image, _ in batch])))
    for (job, scene, image, missing), probs in zip(batch, r.numpy(predictor.probabilities(logits)), strict=True):
        with Outputs(job, scene, predictor, args) as out:
            out.add(0, image, probs, missing)
        yield scene.height * scene.width, out.missing


def predict_scene(predictor: Predictor, job: Job, args: argparse.Namespace, scene: Scene | None = None
                  ) -> tuple[int, int]:
    """Predict one input (of any size) into its outputs, streamed in bands of rows; (pixels, nodata pixels)."""
    scene = scene or open_scene(predictor, job, args)
    try:
        r = predictor.runner
        # The input rows are needed again beside their logits only for nodata, NaN pixels or the overlay.
        again = args.overlay or scene.nodata is not None or scene.dtype.kind == "f"
        with Outputs(job, scene, predictor, args) as out:
            def read(y: int, x: int, h: int, w: int):  # a window as the model takes it
                return r.asarray(model_input(scene.read(y, x, h, w), None)[0][None])[0]

            for y0, y1, logits in predictor.bands(read, scene.height, scene.width):
                window, missing = model_input(scene.read(y0, 0, y1 - y0, scene.width), scene.nodata) if again \
                    else (None, None)
                out.add(y0, window, r.numpy(predictor.probabilities(logits[None]))[0], missing)
        return scene.height * scene.width, out.missing
    finally:
        scene.close()


def cpu_limits(predictor: Predictor, args: argparse.Namespace, cuda: bool) -> None:
    """Batch (and, on the CPU, tile) sizes not given: memory grows with the pixels of one forward pass, about
    0.7 KB per pixel on the CPU, so the CPU gets tiles up to 384 px and at most a quarter megapixel per pass."""
    if not cuda and args.tile_size is None and not predictor.fixed_size:
        predictor.tile_size = min(predictor.tile_size, CPU_TILE)
    if args.batch_size is not None:
        predictor.batch_size = args.batch_size
    else:
        predictor.batch_size = 16 if cuda else max(1, CPU_PIXELS // predictor.tile_size ** 2)


def on_gpu(runner) -> bool:
    """The model runs on a GPU: PyTorch on a CUDA device, or onnxruntime with its CUDA provider."""
    session = getattr(runner, "session", None)
    return str(runner.device).startswith("cuda") or (session is not None
                                                     and "CUDAExecutionProvider" in session.get_providers())


def load_predictor(args: argparse.Namespace) -> Predictor:
    settings = {"tile_size": args.tile_size, "overlap": args.overlap, "tta": args.tta, "threshold": args.threshold}
    predictor = Predictor.load(Path(args.model), device="cpu" if args.cpu else args.device, amp=args.amp, **settings)
    cpu_limits(predictor, args, on_gpu(predictor.runner))
    return predictor


def main() -> None:
    args = get_args_parser().parse_args()
    predictor = load_predictor(args)
    out = output_folder(Path(args.output_dir), "-o")
    jobs = plan_jobs(args, predictor.meta.add_dirs, out)
    check_scenes(predictor, jobs)
    from tqdm import tqdm

    t0, pixels, missing = time.monotonic(), 0, 0
    for n, m in tqdm(predict_jobs(predictor, jobs, args), total=len(jobs), desc="predicting", unit="image",
                     leave=False, dynamic_ncols=True):
        pixels, missing = pixels + n, missing + m
    seconds = max(time.monotonic() - t0, 1e-6)
    extra = f", {missing / max(pixels, 1):.1%} of pixels nodata" if missing else ""
    print(f"predicted {len(jobs)} image(s), {pixels / 1e6:.1f} Mpx in {seconds:.1f} s ({pixels / 1e6 / seconds:.2f} "
          f"Mpx/s){extra}; masks in {out}")


if __name__ == "__main__":
    run_cli(main)
