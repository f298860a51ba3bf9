"""Prediction for image files and scenes of any size: an input and its extra bands read in windows (Scene), the model's
input (nodata and NaN pixels), and the outputs (mask, probabilities, overlay) written as bands of rows arrive, so a
scene of any size is predicted in bounded memory. predict.py and serve.py are its front ends; every setting comes as a
parameter, and nothing here parses flags or prints (a choice made for the user is one `warning:` line).

    predictor = Predictor.load("logs/exp", for_scenes=True)
    done = predict_scene(predictor, Job(Path("a.tif"), [], Path("out/a.tif")), Settings())
"""
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from errors import UserError, warn
from fileio import TIFF_EXTENSIONS, image_header, write_image
from inference import Predictor
from raster import PngWriter, RasterReader, TiledTiffWriter, check_size, extratags, gdal_nodata, nodata_pixels

OVERLAY_SIDE = 2048  # overlays (and the thumbnails kept for them) of larger images are shrunk to this side
UNCERTAIN = 0.5  # a pixel whose entropy (0..1) is above this counts as uncertain
READ_CACHE_MB = 16  # decoded TIFF segments kept per raster; decoding again costs little beside the model
SCENE_BYTES = 16 * 2 ** 20  # inputs from this file size on are checked from their headers before any prediction


@dataclass
class Job:
    """One input image, its extra band files in the model's order, and where its outputs go."""
    image: Path
    bands: list[Path]
    mask: Path
    prob: Path
    overlay: Path
    uncertainty: Path | None = None  # the per-pixel uncertainty map, where asked for


@dataclass(frozen=True)
class Settings:
    """What a run writes and how, the same for every input."""
    prob: str | None = None  # also write probabilities: "uint8" or "float16"
    overlay: bool = False
    uncertainty: bool = False  # measure each input's uncertainty (Done.uncertainty, Done.uncertain)
    uncertainty_maps: bool = False  # also write each input's per-pixel uncertainty (Job.uncertainty)
    nodata: float | None = None  # the input value that means no data (None: the GeoTIFF's own GDAL_NODATA)
    # Called after each band of rows of an input predicted in bands, with (job, rows done, rows in all); it may
    # raise to abandon the input (serve.py's --timeout), whose outputs are then not written.
    progress: Callable[["Job", int, int], None] | None = None


@dataclass
class Done:
    """One predicted input: its size, nodata pixels, pixels per class (nodata left out), the threshold that decided
    them, and a thumbnail of image and classes (with Settings.overlay) no larger than OVERLAY_SIDE."""
    job: Job
    height: int
    width: int
    nodata: int
    class_pixels: np.ndarray
    threshold: float
    uncertainty: float  # mean entropy of the probabilities, 0 (sure) .. 1 (every class as likely); 0 unmeasured
    uncertain: float  # share of the pixels whose entropy is over UNCERTAIN
    thumb_image: np.ndarray | None = None
    thumb_classes: np.ndarray | None = None

    @property
    def pixels(self) -> int:
        return self.height * self.width


@dataclass
class Failed:
    """An input that could not be predicted, and why (one line naming the file)."""
    job: Job
    message: str


def outputs(job: Job, settings: Settings) -> list[Path]:
    """The files an input's prediction writes with these settings."""
    return [job.mask, *([job.prob] if settings.prob else []), *([job.overlay] if settings.overlay else []),
            *([job.uncertainty] if settings.uncertainty_maps else [])]


def entropy(probs: np.ndarray) -> np.ndarray:
    """(K, h, w) probabilities -> (h, w) entropy scaled to 0..1 (binary: K = 1, the foreground's)."""
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    if len(p) == 1:
        return -(p[0] * np.log2(p[0]) + (1 - p[0]) * np.log2(1 - p[0]))
    return -(p * np.log(p)).sum(0) / np.log(len(p))


def share_of(jobs: list[Job], index: int, shares: int) -> list[Job]:
    """The index-th (0-based) of `shares` shares of the inputs, balanced by pixels (their headers; a file's size
    where it has none): the largest first, each to the lightest share. The same inputs always share alike, so
    separate runs (job arrays, torchrun processes) together predict every input once."""
    def weight(job: Job) -> int:
        try:
            header = image_header(job.image)
        except UserError:
            header = None
        return header.pixels if header else job.image.stat().st_size

    weights = [weight(j) for j in jobs]
    load, mine = [0] * shares, set()
    for i in sorted(range(len(jobs)), key=lambda i: (-weights[i], str(jobs[i].image))):
        lightest = min(range(shares), key=lambda k: (load[k], k))
        load[lightest] += weights[i]
        if lightest == index:
            mine.add(i)
    return [j for i, j in enumerate(jobs) if i in mine]


def mask_suffix(image: Path) -> str:
    """GeoTIFF in, GeoTIFF out (georeference and nodata kept); else PNG."""
    return ".tif" if image.suffix.lower() in TIFF_EXTENSIONS else ".png"


def mask_writer(path: Path, height: int, width: int, dtype, geo: dict, fill: int | None = None):
    """The writer of a mask file, for every script that writes one (rows given top to bottom): for a .tif path a
    tiled GeoTIFF with the input's georeference (`geo`) and `fill` as its nodata value where given, else a PNG."""
    if path.suffix != ".tif":
        return PngWriter(path, height, width, dtype)
    nodata = {42113: {"dtype": 2, "count": len(str(fill)) + 1, "value": str(fill)}} if fill is not None else {}
    return TiledTiffWriter(path, height, width, 1, dtype, extratags=extratags({**georeference(geo), **nodata}))


def georeference(geo: dict) -> dict:
    """An input's GeoTIFF tags but its nodata value (which is not the outputs')."""
    return {code: tag for code, tag in geo.items() if code != 42113}


def write_mask(folder: Path, image: Path, mask: np.ndarray) -> Path:
    """A whole (H, W) mask of label values for `image`, named and written as predict.py writes one."""
    path = folder / f"{image.stem}{mask_suffix(image)}"
    geo = {}
    if path.suffix == ".tif":
        reader = RasterReader(image)
        geo = reader.geo
        reader.close()
    with mask_writer(path, *mask.shape, mask.dtype, geo) as writer:
        writer.write(mask)
    return path


# ----------------------------------------------------------------------------------------------------- scenes
class Scene:
    """One input image with its extra bands, read as (H, W, C) windows of the stacked type."""

    def __init__(self, job: Job, nodata: float | None):
        self.readers = []
        try:
            for path in (job.image, *job.bands):
                self.readers.append(RasterReader(path, READ_CACHE_MB))
            self.channels, self.dtype, self.types = stack_layout(job, self.readers)
        except BaseException:
            self.close()
            raise
        first = self.readers[0]
        self.height, self.width, self.geo = first.height, first.width, first.geo
        self.nodata = nodata if nodata is not None else gdal_nodata(self.geo, job.image)
        if first.pages > 1:
            warn(f"{job.image} holds {first.pages} images of different sizes or types; predicting the first")

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        parts = [r.read(y, x, h, w) for r in self.readers]
        parts = [p[..., None] if p.ndim == 2 else p for p in parts]
        return np.concatenate(parts, 2).astype(self.dtype, copy=False) if len(parts) > 1 else parts[0]

    def close(self) -> None:
        for r in self.readers:
            r.close()


def stack_layout(job: Job, parts: list) -> tuple[int, np.dtype, str]:
    """Channels, pixel type and the files' own types ("uint8 image + uint16 nir" where they differ) of an input
    stacked with its extra bands (RasterReaders or ImageHeaders); bands that do not fit the image raise."""
    for part, path in zip(parts[1:], job.bands, strict=True):
        check_size(part, parts[0], f"band {path.parent.name}")
        if part.bands not in (1, None):
            raise UserError(f"{part.path}: an extra band must have one channel, this one has {part.bands}")
    dtypes = [np.dtype(p.dtype) for p in parts]
    names = ["image", *(b.parent.name for b in job.bands)]
    types = str(dtypes[0]) if len(set(dtypes)) == 1 else " + ".join(f"{t} {n}" for t, n in zip(dtypes, names,
                                                                                                 strict=True))
    bands = [p.bands for p in parts]
    channels = None if None in bands else sum(bands)
    return channels, dtypes[0] if len(set(dtypes)) == 1 else np.dtype(np.float32), types


def check_headers(predictor: Predictor, jobs: list[Job], min_bytes: int = SCENE_BYTES) -> None:
    """Inputs from min_bytes on checked against the model from their headers before any prediction, so a mistake in
    the last scene stops the run now, not hours in; smaller ones are checked as they come."""
    for job in jobs:
        if job.image.stat().st_size < min_bytes:
            continue
        parts = [image_header(p) for p in (job.image, *job.bands)]
        if None in parts:
            continue
        channels, dtype, types = stack_layout(job, parts)
        problem = predictor.input_problem(str(job.image), channels, str(dtype), types=types) if channels else None
        if problem:
            raise UserError(problem)


def open_scene(predictor: Predictor, job: Job, settings: Settings) -> Scene:
    scene = Scene(job, settings.nodata)
    problem = predictor.input_problem(str(job.image), scene.channels, str(scene.dtype), types=scene.types)
    if problem:
        scene.close()
        raise UserError(problem)
    return scene


def model_input(image: np.ndarray, nodata: float | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The window as the model takes it (NaN set to 0) and its nodata pixels (None: none)."""
    missing = nodata_pixels(image, nodata) if nodata is not None else None
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        missing = ~np.isfinite(image).all(axis=2) | (missing if missing is not None else False)
        image = np.nan_to_num(image, nan=0.0, posinf=0.0, neginf=0.0)
    return image, (missing if missing is not None and missing.any() else None)


# ----------------------------------------------------------------------------------------------------- outputs
@dataclass
class Outputs:
    """The mask (and probabilities) of one scene, written as bands of rows arrive into a tiled GeoTIFF or a PNG,
    neither ever whole in memory; a shrunk copy of image and classes for the overlay."""
    job: Job
    scene: Scene
    predictor: Predictor
    settings: Settings
    missing: int = 0
    entropy_sum: float = 0.0
    uncertain: int = 0
    class_pixels: np.ndarray = field(init=False)

    def __post_init__(self):
        values = self.predictor.meta.labels.label_values()
        self.class_pixels = np.zeros(len(values), np.int64)
        self.lut = values
        free = sorted(set(range(np.iinfo(self.lut.dtype).max + 1)) - set(values.tolist()))
        self.fill = free[-1]  # the mask value of nodata pixels: the largest value no class uses
        scene = self.scene
        self.step = max(1, -(-max(scene.height, scene.width) // OVERLAY_SIDE))
        self.thumb_image, self.thumb_classes = [], []
        georef = georeference(scene.geo)
        self.mask = mask_writer(self.job.mask, scene.height, scene.width, self.lut.dtype, scene.geo,
                                self.fill if scene.nodata is not None else None)
        self.prob = TiledTiffWriter(self.job.prob, scene.height, scene.width, self.predictor.meta.out_channels,
                                    self.settings.prob, extratags=extratags(georef)) if self.settings.prob else None
        self.map = TiledTiffWriter(self.job.uncertainty, scene.height, scene.width, 1, np.uint8,
                                   extratags=extratags(georef)) if self.settings.uncertainty_maps else None
        self.writers = [w for w in (self.mask, self.prob, self.map) if w is not None]

    def __enter__(self) -> "Outputs":
        for w in self.writers:
            w.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for w in self.writers:
            w.__exit__(*exc)
        if exc[0] is None and self.settings.overlay:
            self.write_overlay()

    def add(self, y0: int, image: np.ndarray | None, probs: np.ndarray, missing: np.ndarray | None) -> None:
        """Rows y0.. of the scene: the input window (for the overlay), its (K, h, W) probabilities and nodata pixels."""
        classes = self.predictor.classes(probs[None])[0]
        mask = self.lut[classes]
        if missing is not None:
            mask[missing] = self.fill
            self.missing += int(missing.sum())
        counted = classes if missing is None else classes[~missing]
        self.class_pixels += np.bincount(counted.ravel(), minlength=len(self.class_pixels))
        if self.settings.uncertainty or self.settings.uncertainty_maps:
            self.measure_uncertainty(probs, missing)
        self.mask.write(mask)
        if self.prob is not None:
            p = np.moveaxis(probs, 0, -1)
            p = np.rint(p * 255).astype(np.uint8) if self.settings.prob == "uint8" else p.astype(np.float16)
            if missing is not None:
                p[missing] = 0 if self.settings.prob == "uint8" else np.nan
            self.prob.write(p[..., 0] if p.shape[-1] == 1 else p)
        if self.settings.overlay:
            keep = [i for i in range(len(mask)) if (y0 + i) % self.step == 0]
            self.thumb_image.append(image[keep, ::self.step])
            self.thumb_classes.append(classes[keep, ::self.step].astype(np.uint8))

    def measure_uncertainty(self, probs: np.ndarray, missing: np.ndarray | None) -> None:
        unsure = entropy(probs)
        seen = unsure if missing is None else unsure[~missing]
        self.entropy_sum += float(seen.sum())
        self.uncertain += int((seen > UNCERTAIN).sum())
        if self.map is not None:
            self.map.write(np.rint(unsure * 255).astype(np.uint8))

    def write_overlay(self) -> None:
        import visualize

        rgb = visualize.to_rgb8(np.concatenate(self.thumb_image))
        pic = visualize.overlay(rgb, np.concatenate(self.thumb_classes), self.predictor.meta.labels.num_classes)
        write_image(self.job.overlay, pic)

    def done(self) -> Done:
        thumbs = (np.concatenate(self.thumb_image), np.concatenate(self.thumb_classes)) if self.settings.overlay \
            else (None, None)
        counted = max(1, self.scene.height * self.scene.width - self.missing)
        return Done(self.job, self.scene.height, self.scene.width, self.missing, self.class_pixels,
                    self.predictor.threshold, self.entropy_sum / counted, self.uncertain / counted, *thumbs)


# ----------------------------------------------------------------------------------------------------- predicting
def predict_jobs(predictor: Predictor, jobs: list[Job], settings: Settings) -> Iterator[Done | Failed]:
    """Each input's Done, or Failed where its files cannot be read or do not fit the model: one bad file among many
    stops nothing. Inputs that go through the model whole are predicted in batches of one size across files (one
    small image per forward pass would leave a GPU idle); larger ones stream through the sliding window."""
    batch: list[tuple[Job, Scene, np.ndarray, np.ndarray | None]] = []
    for job in jobs:
        try:
            scene = open_scene(predictor, job, settings)
            whole = predictor.whole(scene.height, scene.width)
            if whole:
                try:
                    image, missing = model_input(scene.read(0, 0, scene.height, scene.width), scene.nodata)
                finally:
                    scene.close()
        except UserError as e:
            yield Failed(job, str(e))
            continue
        except BaseException:
            yield from predict_whole(predictor, batch, settings)  # the inputs before a failure keep their masks
            raise
        if not whole:
            yield from predict_whole(predictor, batch, settings)
            batch = []
            try:
                yield predict_scene(predictor, job, settings, scene)
            except UserError as e:  # a damaged part found mid-scene: its outputs are not written
                yield Failed(job, str(e))
            continue
        if batch and (image.shape != batch[0][2].shape or image.dtype != batch[0][2].dtype
                      or len(batch) == predictor.images_per_pass(scene.height, scene.width)):
            yield from predict_whole(predictor, batch, settings)
            batch = []
        batch.append((job, scene, image, missing))
    yield from predict_whole(predictor, batch, settings)


def predict_whole(predictor: Predictor, batch: list, settings: Settings) -> Iterator[Done]:
    """Images of one size and type, (job, closed scene, image, nodata pixels), in one forward pass."""
    if not batch:
        return
    r = predictor.runner
    logits = predictor.logits(r.asarray(np.stack([image for _, _, image, _ in batch])))
    for (job, scene, image, missing), probs in zip(batch, r.numpy(predictor.probabilities(logits)), strict=True):
        with Outputs(job, scene, predictor, settings) as out:
            out.add(0, image, probs, missing)
        yield out.done()


def predict_scene(predictor: Predictor, job: Job, settings: Settings, scene: Scene | None = None) -> Done:
    """Predict one input (of any size) into its outputs, streamed in bands of rows."""
    scene = scene or open_scene(predictor, job, settings)
    try:
        r = predictor.runner
        # The input rows are needed again beside their logits only for nodata, NaN pixels or the overlay.
        again = settings.overlay or scene.nodata is not None or scene.dtype.kind == "f"
        with Outputs(job, scene, predictor, settings) as out:
            def read(y: int, x: int, h: int, w: int):  # a window as the model takes it
                return r.asarray(model_input(scene.read(y, x, h, w), None)[0][None])[0]

            for y0, y1, logits in predictor.bands(read, scene.height, scene.width):
                window, missing = model_input(scene.read(y0, 0, y1 - y0, scene.width), scene.nodata) if again \
                    else (None, None)
                out.add(y0, window, r.numpy(predictor.probabilities(logits[None]))[0], missing)
                if settings.progress is not None:
                    settings.progress(job, y1, scene.height)
        return out.done()
    finally:
        scene.close()
