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
import os
import sys
import time
from pathlib import Path

from cli import Parser, add_runtime_flags, progress, shard
from errors import UserError, is_main_process, note, problem_list, run_cli, warn
from fileio import check_decodable, dead_link, image_header, is_image_file, output_folder, read_list
from inference import Predictor, add_prediction_flags
from scenes import Failed, Job, Settings, check_headers, mask_suffix, outputs, predict_jobs, share_of

FAILED_FIRST = 10  # a run whose first inputs all fail stops there: the rest would most likely fail alike
LARGE_PIXELS = 10 ** 8  # inputs from this size on are announced with their size before prediction starts


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
    g.add_argument("--uncertainty", action="store_true",
                   help="also write uncertainty.csv: each image's uncertainty (mean entropy of its probabilities, "
                        "0 sure .. 1 undecided), its share of uncertain pixels and its predicted class shares, most "
                        "uncertain first: the images to label next")
    g.add_argument("--uncertainty-maps", action="store_true",
                   help="also write <stem>_uncertainty.tif: each pixel's uncertainty, 0..255")
    g = p.add_argument_group("scale", "torchrun --nproc_per_node=N predict.py ... shares the inputs among N processes")
    g.add_argument("--shard", type=shard, default=None, metavar="K/N",
                   help="predict the K-th of N shares of the inputs (job arrays: SLURM_ARRAY_TASK_ID, ...); the N "
                        "shares together are every input once, balanced by pixels")
    g = p.add_argument_group("runtime")
    add_runtime_flags(g, workers=False)
    return p


# ----------------------------------------------------------------------------------------------------- inputs
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


def plan_jobs(args: argparse.Namespace, band_names: list[str], out: Path, settings: Settings,
              share: tuple[int, int] = (0, 1)) -> list[Job]:
    """This process's share (index, shares) of every input with its bands and outputs; clashing or existing outputs
    stop the run before any work."""
    images = list_images(Path(args.input))
    given = band_sources(args.band, band_names, len(images) == 1)
    jobs, seen = [], {}
    for image in images:
        job = Job(image, [find_band(image, n, given) for n in band_names], out / f"{image.stem}{mask_suffix(image)}",
                  out / f"{image.stem}_prob.tif", out / f"{image.stem}_overlay.jpg",
                  out / f"{image.stem}_uncertainty.tif")
        if job.mask.name in seen:
            raise UserError(f"{image} and {seen[job.mask.name]} would both write {job.mask}; predict them into "
                            "separate -o folders")
        seen[job.mask.name] = image
        jobs.append(job)
    jobs = share_of(jobs, *share) if share[1] > 1 else jobs
    written = [p for j in jobs for p in outputs(j, settings)]
    inputs = {p.resolve() for j in jobs for p in (j.image, *j.bands)}
    if any(p.resolve() in inputs for p in written):
        raise UserError(f"-o {out}: the masks would replace input images; choose another folder")
    if out.resolve() in {j.image.parent.resolve() for j in jobs}:
        warn(f"-o {out} is the folder of the input images: each mask lands beside its image under the same name, "
             "so a later run over this folder takes the masks for inputs; choose another -o")
    existing = [p for p in written if p.exists()]
    if existing and not args.overwrite and not args.skip_existing:
        raise UserError(f"-o {out}: {len(existing)} output file(s) exist already, e.g. {existing[0].name}; add "
                        "--skip-existing to predict only the inputs without them (to finish a stopped run), "
                        "--overwrite to replace them, or choose another folder")
    if args.skip_existing:
        todo = [j for j in jobs if not all(p.exists() for p in outputs(j, settings))]
        print(f"skipping {len(jobs) - len(todo)} of {len(jobs)} input(s): their outputs are in {out} already")
        return todo
    return jobs


def announce_large(predictor: Predictor, jobs: list[Job]) -> None:
    """Say how large the large inputs are before hours go into them (from their headers, without decoding)."""
    for job in jobs:
        try:
            header = image_header(job.image)
            check_decodable(header)
        except UserError:  # damaged or not decodable: said when its turn comes
            continue
        if header is not None and header.pixels >= LARGE_PIXELS:
            tiles = predictor.tile_count(header.height, header.width)
            note(f"{job.image} is {header.size()}: {tiles:,} tiles of {predictor.tile_size} px; its progress is "
                 "shown in rows")


# ----------------------------------------------------------------------------------------------------- running
def run(predictor: Predictor, jobs: list[Job], settings: Settings, main: bool) -> tuple[int, int, list, list]:
    """Predict every input: (pixels, nodata pixels, one line per input that could not be predicted, uncertainty
    rows). Stops early when the first FAILED_FIRST inputs all fail."""
    names = predictor.meta.class_names
    pixels = missing = done = 0
    failed, rows = [], []
    with progress(total=len(jobs), desc="predicting", unit="image", leave=False, disable=not main) as bar:
        for result in predict_jobs(predictor, jobs, settings):
            bar.update()
            if isinstance(result, Failed):
                failed.append(result.message)
                if len(failed) == FAILED_FIRST and not done:
                    raise problem_list(f"the first {FAILED_FIRST} inputs all failed, so the run stopped:", failed)
                continue
            done, pixels, missing = done + 1, pixels + result.pixels, missing + result.nodata
            shares = result.class_pixels / max(1, result.class_pixels.sum())
            rows.append([str(result.job.image), round(result.uncertainty, 6), round(result.uncertain, 6),
                         *(round(float(x), 6) for x in shares)])
    return pixels, missing, failed, [["image", "uncertainty", "uncertain_pixels", *[f"share_{n}" for n in names]],
                                     *rows]


def my_share(args: argparse.Namespace) -> tuple[int, int]:
    """(index, shares) of this process: its --shard K/N, split again among torchrun's processes."""
    k, n = args.shard or (1, 1)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    return (k - 1) * world + rank, n * world


def gathered(value) -> list:
    """Every process's value, in rank order, under torchrun (over gloo: small values, any device); [value] alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return [value]
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def write_uncertainty(out: Path, rows: list, shard: tuple[int, int] | None) -> Path:
    """uncertainty.csv (uncertainty_KofN.csv for a shard), most uncertain first."""
    import csv
    import io

    from fileio import write_text

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(rows[0])
    writer.writerows(sorted(rows[1:], key=lambda r: (-r[1], r[0])))
    path = out / ("uncertainty.csv" if not shard or shard[1] == 1 else f"uncertainty_{shard[0]}of{shard[1]}.csv")
    write_text(path, buf.getvalue())
    return path


def main() -> None:
    args = get_args_parser().parse_args()
    device = "cpu" if args.cpu else args.device or (f"cuda:{os.environ['LOCAL_RANK']}" if "LOCAL_RANK" in os.environ
                                                   and cuda_available() else None)
    predictor = Predictor.load(Path(args.model), device=device, amp=args.amp, tile_size=args.tile_size,
                               overlap=args.overlap, tta=args.tta, threshold=args.threshold,
                               batch_size=args.batch_size, for_scenes=True)
    out = output_folder(Path(args.output_dir), "-o")
    settings = Settings(prob=args.prob, overlay=args.overlay, uncertainty=args.uncertainty,
                        uncertainty_maps=args.uncertainty_maps, nodata=args.nodata, progress=scene_progress())
    share = my_share(args)
    jobs = plan_jobs(args, predictor.meta.add_dirs, out, settings, share)
    check_headers(predictor, jobs)
    announce_large(predictor, jobs)
    t0 = time.monotonic()
    results = gathered((len(jobs), *run(predictor, jobs, settings, is_main_process())))
    if not is_main_process():
        return
    inputs, pixels, missing = (sum(r[i] for r in results) for i in range(3))
    failed, rows = [m for r in results for m in r[3]], [results[0][4][0], *(row for r in results for row in r[4][1:])]
    seconds = max(time.monotonic() - t0, 1e-6)
    extra = f", {missing / max(pixels, 1):.1%} of pixels nodata" if missing else ""
    if args.uncertainty:
        extra += f"; images ranked by uncertainty in {write_uncertainty(out, rows, args.shard)}"
    # Under torchrun, whose own notes go to stderr, the summary for every process closes that stream: a log's last line.
    print(f"predicted {inputs - len(failed)} image(s), {pixels / 1e6:.1f} Mpx in {seconds:.1f} s "
          f"({pixels / 1e6 / seconds:.2f} Mpx/s){extra}; masks in {out}",
          file=sys.stderr if len(results) > 1 else sys.stdout, flush=True)
    if failed:
        raise problem_list(f"{len(failed)} of {inputs} input(s) could not be predicted; the others were. Fix or "
                           "remove these, then run the same command with --skip-existing to finish:", failed)


def cuda_available() -> bool:
    """A CUDA device for this torchrun process (torch is there: torchrun came with it)."""
    import torch

    return torch.cuda.is_available()


def scene_progress():
    """A progress bar in rows for each input predicted in bands (a large scene), shown from its first band."""
    bars: dict = {}

    def update(job: Job, rows: int, height: int) -> None:
        bar = bars.get(job.image)
        if bar is None:
            for old in bars.values():
                old.close()
            bars.clear()
            bar = bars[job.image] = progress(total=height, desc=job.image.name, unit="row", leave=False, position=1)
        bar.update(rows - bar.n)

    return update


if __name__ == "__main__":
    run_cli(main)
