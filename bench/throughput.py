"""Throughput of training and validation, measured against the model's own limit.

  python bench/throughput.py                                   # defaults for this machine
  python bench/throughput.py --data ../shared/data/water_s2l8 --add-dirs nir --json out.json
  python bench/throughput.py --synthetic-size 512              # generated 512x512 tiles on disk

Measures, after warm-up, the median of --repeats timed runs (CUDA synchronised):
  model_only    train steps (forward, loss, backward, optimizer step) on one device-resident batch: the limit
  loader_only   samples/s of the real Dataset + preset + DataLoader over the folder, nothing else
  end_to_end    samples/s of the real Trainer's training epoch (no validation), and its ratio to model_only
  val_forward   forward passes on a device-resident batch (no grad): the validation limit
  val_loader    images/s of the val loader alone (reading, batching in the workers, handing over), nothing on the device
  val_tiles     images/s of validate.py's loop over tile-size images (reading, batching, metrics)
  val_sliding   megapixels/s of the sliding window over one large image
Defaults: unet + resnet34, 512 px, batch 16 on CUDA; unet + resnet18, 128 px, batch 8 on CPU; preset hard.
"""
import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would drown the table

import numpy as np  # noqa: E402
import segmentation_models_pytorch as smp  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import loaders  # noqa: E402
from augmentations import PRESETS, train_transform  # noqa: E402
from checkpoint import ModelMeta  # noqa: E402
from checks import channel_stats, scan_samples  # noqa: E402
from dataset import SegmentationDataset, find_samples  # noqa: E402
from fileio import write_image  # noqa: E402
from labels import Labels  # noqa: E402
from loaders import EpochBatchSampler, RamCache, eval_loader, loader_options  # noqa: E402
from metrics import ConfusionMatrix  # noqa: E402
from model import build_model  # noqa: E402
from runtime import AMP_CHOICES, amp_dtype, configure, cpu_count, default_workers, select_device  # noqa: E402
from trainer import TrainConfig, Trainer  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default="unet")
    p.add_argument("--encoder", default=None, help="default: resnet34 on CUDA, resnet18 on CPU")
    p.add_argument("--image-size", type=int, default=None, help="default: 512 on CUDA, 128 on CPU")
    p.add_argument("-b", "--batch-size", type=int, default=None, help="default: 16 on CUDA, 8 on CPU")
    p.add_argument("-a", "--aug", default="hard", choices=list(PRESETS))
    p.add_argument("-w", "--workers", type=int, default=None, help="default: as train.py")
    p.add_argument("--amp", default="auto", choices=AMP_CHOICES)
    p.add_argument("--cache", default="none", choices=["none", "ram"], help="as train.py --cache")
    p.add_argument("--compile", action="store_true", help="as train.py --compile (compile time is reported)")
    p.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                   help="memory format of model and batches (auto: on for CUDA and CPU, as train.py)")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "water_s2l8"),
                   help="dataset root with train/ (and val/) in segkit's layout")
    p.add_argument("--add-dirs", default="", help="extra band folders, e.g. nir")
    p.add_argument("--synthetic-size", type=int, default=None,
                   help="generate --synthetic-count RGB 8-bit tiles of this size on disk instead of --data")
    p.add_argument("--synthetic-count", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="batches per timed repeat (model-only, loader-only)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported")
    p.add_argument("--sliding-size", type=int, default=None, help="large image side (default 4 x image size)")
    p.add_argument("--sharing", choices=["file_system", "file_descriptor"], default=loaders.SHARING,
                   help="how loader workers hand tensors over (torch.multiprocessing sharing strategy)")
    p.add_argument("--json", default=None, help="also write the results as flat JSON here")
    return p


def make_synthetic(folder: Path, size: int, count: int, bands: list[str]) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", count), ("val", max(8, count // 2))):
        for sub in ("images", "gt", *bands):
            (folder / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            mask = np.zeros((size, size), np.uint8)
            cy, cx, r = rng.integers(0, size, 3)
            yy, xx = np.ogrid[:size, :size]
            mask[(yy - cy) ** 2 + (xx - cx) ** 2 < (r // 2) ** 2] = 255
            image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            write_image(folder / split / "images" / f"{i:05d}.png", image, compression=None)
            write_image(folder / split / "gt" / f"{i:05d}.png", mask)
            for b in bands:
                write_image(folder / split / b / f"{i:05d}.png", image[..., 0])
    return folder


def timed(fn, repeats: int, sync) -> list[float]:
    """Seconds of each of `repeats` calls of fn, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def main(args: argparse.Namespace) -> dict:
    loaders.SHARING = args.sharing
    device = select_device(args.cpu, args.device)
    cuda = device.type == "cuda"
    encoder = args.encoder or ("resnet34" if cuda else "resnet18")
    size = args.image_size or (512 if cuda else 128)
    batch = args.batch_size or (16 if cuda else 8)
    workers = args.workers if args.workers is not None else default_workers(device)
    amp = amp_dtype(args.amp, device)
    add_dirs = args.add_dirs.split()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    configure(device)
    scratch = None
    data = Path(args.data)
    if args.synthetic_size:
        scratch = Path(tempfile.mkdtemp(prefix="segkit-bench-"))
        data = make_synthetic(scratch, args.synthetic_size, args.synthetic_count, add_dirs)
    try:
        return run(args, device, encoder, size, batch, workers, amp, add_dirs, sync, data)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def run(args, device, encoder, size, batch, workers, amp, add_dirs, sync, data: Path) -> dict:
    channels_last = args.channels_last == "on" or (args.channels_last == "auto" and device.type in ("cuda", "cpu"))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    labels = Labels.from_args(None, None, None)
    samples = find_samples(data / "train", add_dirs)
    infos = scan_samples(samples, with_stats=True, workers=workers)
    stats = channel_stats(infos, labels)
    channels, dtype = infos[0].channels, infos[0].dtype
    sizes = [(i.height, i.width) for i in infos]
    meta = ModelMeta(arch=args.model, encoder=encoder, in_channels=channels, out_channels=1, labels=labels,
                     add_dirs=add_dirs, stats=stats, dtype=dtype, image_size=size, resize=False, val_tile_size=size)
    cache = RamCache(samples, labels.lut(), sizes, channels, dtype, workers) if args.cache == "ram" else None
    model, _ = build_model(meta)
    model.to(device, memory_format=memory_format)
    pad = any(h < size or w < size for h, w in sizes)
    transform = train_transform(args.aug, size, channels == 3 and dtype == "uint8", False, pad)
    dataset = SegmentationDataset(samples, labels, stats, transform, cache)
    loader = DataLoader(dataset, batch_sampler=EpochBatchSampler(len(dataset), batch, seed=0),
                        **loader_options(workers, device, niceness=10))
    cfg = TrainConfig(Path(tempfile.gettempdir()), device, 1000, amp, channels_last, args.compile, seed=0,
                      warmup_epochs=0, val_batch_size=batch)
    trainer = Trainer(cfg, model, loader, [], meta)
    results = {}
    # 1. model only: the training step on one device-resident batch (the first call compiles, if asked)
    x = torch.randint(0, 255, (batch, size, size, channels), device=device, dtype=torch.uint8)
    if dtype != "uint8":
        x = torch.rand(batch, size, size, channels, device=device)
    y = (torch.rand(batch, size, size, device=device) > 0.7).to(torch.uint8)
    one = [{"image": x, "mask": y}]
    sync()
    t0 = time.perf_counter()
    trainer.train_one_epoch(1, one)
    sync()
    results["first_step_s"] = time.perf_counter() - t0
    steps = len(loader)
    t = timed(lambda: trainer.train_one_epoch(1, one * steps), args.repeats, sync)
    results["model_only"] = steps * batch / statistics.median(t)

    # 2. loader only: the real data path, nothing on the device; one stream of batches, as Trainer.fit() uses
    stream = iter(loader)
    t = timed(lambda: list(itertools.islice(stream, args.steps)), args.repeats, lambda: None)
    results["loader_only"] = args.steps * batch / statistics.median(t)

    # 3. end to end: the real trainer's epochs over the real loader
    epochs = itertools.count(2)
    t = timed(lambda: trainer.train_one_epoch(next(epochs), itertools.islice(stream, steps)), args.repeats, sync)
    results["end_to_end"] = steps * batch / statistics.median(t)
    results["end_to_end_over_model_only"] = results["end_to_end"] / results["model_only"]
    results["loader_over_end_to_end"] = results["loader_only"] / results["end_to_end"]
    results.update(validation(args, trainer, data, add_dirs, labels, stats, batch, size, workers, device, sync))
    results.update({
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"CPU ({platform.processor() or platform.machine()}, {cpu_count()} cores)",
        "torch": str(torch.__version__), "smp": str(smp.__version__), "model": args.model, "encoder": encoder,
        "image_size": size, "batch_size": batch, "aug": args.aug, "workers": workers,
        "amp": str(amp).replace("torch.", "") if amp else "off", "channels": channels, "data": str(data),
        "train_images": len(samples), "repeats": args.repeats, "steps": args.steps, "cache": args.cache,
        "compile": args.compile, "channels_last": channels_last, "sharing": args.sharing,
    })
    return results


def validation(args, trainer, data, add_dirs, labels, stats, batch, size, workers, device, sync) -> dict:
    """The forward limit, the validation loop over tile-size images, and the sliding window."""
    predictor, results = trainer.predictor, {}
    predictor.runner.model.eval()
    x = predictor.runner.asarray(torch.randint(0, 255, (batch, size, size, len(stats.mean)), dtype=torch.uint8))

    def forward():
        for _ in range(args.steps):
            predictor.runner.forward(x)

    t = timed(forward, args.repeats, sync)
    results["val_forward_only"] = args.steps * batch / statistics.median(t)
    val_dir = data / "val" if (data / "val" / "images").is_dir() else data / "train"
    val_all = find_samples(val_dir, add_dirs)
    val_samples = [s for s, i in zip(val_all, scan_samples(val_all, False, workers), strict=True)
                   if (i.height, i.width) == (size, size)]
    if val_samples:
        loader = eval_loader(SegmentationDataset(val_samples, labels, stats), [(size, size)] * len(val_samples), batch,
                             size, workers, device, repeat=True)
        def validate():  # the trainer's evaluation: batches from the workers, metrics on the device
            cm = ConfusionMatrix(labels.num_classes, device)
            for b in itertools.islice(iter_loader, len(loader)):
                logits = predictor.logits(predictor.runner.asarray(b["image"]))
                cm.update(predictor.classes(predictor.probabilities(logits)), b["mask"].to(device))

        iter_loader = iter(loader)
        t = timed(lambda: list(itertools.islice(iter_loader, len(loader))), args.repeats, lambda: None)
        results["val_loader_only"] = len(val_samples) / statistics.median(t)
        t = timed(validate, args.repeats, sync)
        results["val_tiles"] = len(val_samples) / statistics.median(t)
        results["val_tiles_over_forward"] = results["val_tiles"] / results["val_forward_only"]
    side = args.sliding_size or 4 * size
    big = predictor.runner.asarray(torch.randint(0, 255, (1, side, side + size // 2, len(stats.mean)),
                                                 dtype=torch.uint8))
    t = timed(lambda: predictor.logits(big), args.repeats, sync)
    results["val_sliding_mpx_s"] = big.shape[-1] * big.shape[-2] / 1e6 / statistics.median(t)
    return results


def print_table(r: dict) -> None:
    print(f"\n{r['device']} | torch {r['torch']} | smp {r['smp']} | {r['model']}/{r['encoder']} {r['image_size']}px "
          f"batch {r['batch_size']} | {r['channels']} channels | preset {r['aug']} | {r['workers']} workers | "
          f"amp {r['amp']} | cache {r['cache']} | compile {r['compile']} | channels_last {r['channels_last']} | "
          f"sharing {r['sharing']}")
    print(f"{'measure':<34} {'value':>10}")
    rows = [("first train step (s, incl. compile)", "first_step_s"),
            ("model-only train steps (samples/s)", "model_only"),
            ("loader-only (samples/s)", "loader_only"),
            ("end-to-end epoch (samples/s)", "end_to_end"),
            ("  end-to-end / model-only", "end_to_end_over_model_only"),
            ("  loader-only / end-to-end", "loader_over_end_to_end"),
            ("val forward-only (images/s)", "val_forward_only"),
            ("val loader-only (images/s)", "val_loader_only"),
            ("val tiles, validate loop (images/s)", "val_tiles"),
            ("  val tiles / forward-only", "val_tiles_over_forward"),
            ("val sliding window (Mpx/s)", "val_sliding_mpx_s")]
    for name, key in rows:
        if key in r:
            print(f"{name:<34} {r[key]:>10.2f}")


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    result = main(args)
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
