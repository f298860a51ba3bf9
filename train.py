"""Train a segmentation model on a plain-folder dataset.

  python train.py -d data/sample --add-dirs nir                 # binary (mask values 0/255)
  python train.py -d my_data -m unet++ --encoder tu-convnext_tiny --class-list "1 2 5" -e 100 -a medium

Layout: <dataset>/train/{images,gt,<add-dirs>} and <dataset>/val/..., files paired by name.
Outputs go to <log-dir>/<exp-name>/: best.pth, last.pth, metrics.csv, TensorBoard events
(tensorboard --logdir=./logs). Running again with the same --exp-name resumes where it stopped.
"""
import argparse
import json
import math
import time
from collections import Counter
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import segmentation_models_pytorch as smp
import torch
from torch.utils.data import DataLoader

from augmentations import PRESETS, train_transform
from dataset import (
    ChannelStats,
    Labels,
    RamCache,
    SegmentationDataset,
    channel_stats,
    dataset_problems,
    find_samples,
    fingerprint,
    folder_label,
    scan_samples,
    unlisted_note,
)
from errors import UserError, run_cli
from fileio import write_text
from losses import LOSS_NAMES, SegmentationLoss
from model import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    SEGKIT_VERSION,
    architecture,
    build_model,
    check_encoder,
    load_checkpoint,
    min_input_size,
)
from runtime import AMP_CHOICES, amp_dtype, configure, default_workers, select_device, worker_init
from trainer import EpochBatchSampler, EvalSet, SizeGroupedBatchSampler, Trainer

# Flags a resumed run may change; every other setting comes from the checkpoint.
RESUME_OVERRIDES = {"epochs", "workers", "cpu", "device", "dataset_dir", "val_dir", "add_val_dirs", "adv_freq",
                    "use_only_add_val", "log_dir", "exp_name", "patience", "amp", "val_tile_size", "log_worst",
                    "encoder_weights", "cache", "compile", "deterministic"}
# Flags that define the model: a resumed run must not change them.
MODEL_FLAGS = ("model", "encoder", "add_dirs", "class_list", "max_mask_val", "ignore_label", "image_size", "resize")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("-d", "--dataset-dir", required=True,
                   help="dataset root holding train/ and val/, each with images/, gt/ and the --add-dirs folders")
    g.add_argument("-val", "--val-dir", help="validation folder with images/ and gt/ (default: DATASET_DIR/val)")
    g.add_argument("--add-dirs", default="", help='extra one-band folders stacked after the image channels, '
                                                  'e.g. "nir kv" (default: none)')
    g.add_argument("--add-val-dirs", metavar="FILE",
                   help="text file naming more validation folders, one per line; the best model is chosen on the "
                        "size-weighted mean mIoU of all val sets")
    g.add_argument("--adv-freq", type=int, default=1, help="evaluate the --add-val-dirs sets every N epochs (1)")
    g.add_argument("--use-only-add-val", action="store_true",
                   help="skip the main val set; choose the best model on the --add-val-dirs sets")
    g.add_argument("--class-list", default=None,
                   help='mask values that are classes: "255" (default, binary), "1 2 5" (multi-class, 0 is '
                        "background); other values in the masks become background")
    g.add_argument("--max-mask-val", type=int, default=None, help="classes are mask values 1..N (multi-class)")
    g.add_argument("--ignore-label", type=int, default=None,
                   help="mask value whose pixels count in neither loss nor metrics (e.g. 254 for 'unknown')")
    g.add_argument("--image-size", type=int, default=None,
                   help="training crop size, a multiple of 32: larger images are randomly cropped, smaller padded "
                        "(default: from the data, at most 512)")
    g.add_argument("--resize", action="store_true", help="stretch every image to --image-size instead of cropping")
    g.add_argument("-a", "--aug", default="light", choices=list(PRESETS),
                   help="augmentation preset (default light; see python -m augmentations --help)")

    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", default="unet",
                   help="architecture: unet, unet++, manet, linknet, fpn, pspnet, pan, deeplabv3, deeplabv3+, "
                        "upernet, segformer, dpt (default unet)")
    g.add_argument("--encoder", default="resnet34",
                   help="SMP encoder (resnet34, efficientnet-b3, mit_b2, ...) or any timm model as tu-<name> "
                        "(default resnet34)")
    g.add_argument("--encoder-weights", default="auto",
                   help="auto (ImageNet if it can be downloaded or is cached, else random with a warning), "
                        "imagenet (or another tag; must load), none, or a path to a weights file (default auto)")

    g = p.add_argument_group("training")
    g.add_argument("-e", "--epochs", type=int, default=50, help="epochs in all; more than done continues (50)")
    g.add_argument("-b", "--batch-size", type=int, default=8, help="batch size (8)")
    g.add_argument("-lr", "--learning-rate", type=float, default=1e-3, help="peak learning rate (1e-3)")
    g.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZERS), help="(adamw)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="(1e-4)")
    g.add_argument("--scheduler", default="cosine", choices=list(SCHEDULES),
                   help="learning-rate schedule, per step; plateau halves it when val mIoU stalls (cosine)")
    g.add_argument("--warmup-epochs", type=float, default=1.0,
                   help="linear warm-up, at most a tenth of the run (1)")
    g.add_argument("--loss", default="dice", choices=LOSS_NAMES, help="(dice)")
    g.add_argument("--pos-weight", default=None,
                   help="bce weight of foreground pixels, a number or 'auto' (background/foreground ratio, <= 10)")
    g.add_argument("--class-weights", default=None,
                   help='ce weight per class, "w0 w1 ..." (background first) or auto (median frequency)')
    g.add_argument("--patience", type=int, default=0, help="stop after N epochs without a better val mIoU (0: off)")
    g.add_argument("--seed", type=int, default=42, help="seeds data order, augmentations and init (42)")

    g = p.add_argument_group("runtime")
    g.add_argument("-w", "--workers", type=int, default=None, help="data-loading processes (default: from the CPU)")
    g.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    g.add_argument("--device", default=None, help="device: 0, cuda:1, mps, cpu (default: first GPU, else CPU)")
    g.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help="mixed precision: auto = bf16 on GPUs that have it, fp16 on other GPUs, off on CPU")
    g.add_argument("--cache", default="none", choices=["none", "ram"],
                   help="ram: decode every image once and keep it in shared memory (small datasets, slow decoding)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the training step (a minute of compiling first; faster steps on GPUs)")
    g.add_argument("--deterministic", action="store_true",
                   help="repeatable GPU results: deterministic kernels, no cuDNN autotuning (slower)")
    g.add_argument("--val-tile-size", type=int, default=1024,
                   help="validation runs whole images; larger ones go in overlapping tiles of this size (1024)")

    g = p.add_argument_group("output")
    g.add_argument("-log", "--log-dir", default="logs", help="folder of experiments (logs)")
    g.add_argument("--exp-name", default=None,
                   help="experiment folder name; an existing one resumes (default: model_encoder_time)")
    g.add_argument("--log-worst", type=int, default=4,
                   help="val samples with the lowest IoU shown in TensorBoard each epoch (4)")
    return p


# -------------------------------------------------------------------------------------------------- helpers
def check_flags(args: argparse.Namespace) -> None:
    """Fail on flag mistakes before any data is read."""
    if args.image_size is not None and (args.image_size < 32 or args.image_size % 32):
        near = max(32, round(args.image_size / 32) * 32)
        raise UserError(f"--image-size {args.image_size} is not a multiple of 32 (encoders halve it 5 times); "
                        f"use --image-size {near}")
    for flag, value in (("-e/--epochs", args.epochs), ("-b/--batch-size", args.batch_size),
                        ("--adv-freq", args.adv_freq), ("--val-tile-size", args.val_tile_size)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if args.val_tile_size % 32:
        raise UserError(f"--val-tile-size {args.val_tile_size} must be a multiple of 32")
    if args.learning_rate <= 0:
        raise UserError(f"-lr {args.learning_rate} must be positive")
    if args.use_only_add_val and not args.add_val_dirs:
        raise UserError("--use-only-add-val needs --add-val-dirs FILE")
    check_encoder(args.encoder)
    smallest = min_input_size(args.model)
    if args.image_size is not None and args.image_size < smallest:
        raise UserError(f"-m {args.model} needs --image-size {smallest} or more")


def resume_args(args: argparse.Namespace, meta: dict, exp_dir: Path) -> argparse.Namespace:
    """The saved training settings, with the flags a resumed run may change taken from this command line."""
    saved = meta["train_args"]
    for key in MODEL_FLAGS:
        if key == "image_size" and args.image_size is None:
            continue
        if key in saved and getattr(args, key) != saved[key]:
            raise UserError(f"experiment {exp_dir} was trained with --{key.replace('_', '-')} {saved[key]}, not "
                            f"{getattr(args, key)}; use a new --exp-name, or the same setting to resume")
    changed = [f"--{k.replace('_', '-')} {getattr(args, k)} (saved {v})" for k, v in saved.items()
               if k not in RESUME_OVERRIDES and k not in MODEL_FLAGS and hasattr(args, k) and getattr(args, k) != v]
    if changed:
        print(f"note: resuming with the experiment's saved settings; ignoring {', '.join(changed)}")
    return argparse.Namespace(**{**vars(args), **{k: v for k, v in saved.items() if k not in RESUME_OVERRIDES}})


def read_add_val_list(path: str) -> list[tuple[str, Path]]:
    """(name, folder) for each line of an --add-val-dirs file; relative folders are relative to the file."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--add-val-dirs {path}: file not found (a text file with one folder per line)")
    sets, seen = [], {"val"}
    for line in file.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        folder = Path(line) if Path(line).is_absolute() else file.parent / line
        name = "".join(c if c.isalnum() else "_" for c in folder_label(folder)) or "set"
        while name in seen:
            name += "_"
        seen.add(name)
        sets.append((name, folder))
    if not sets:
        raise UserError(f"--add-val-dirs {path} names no folder")
    return sets


def auto_image_size(sizes: list[tuple[int, int]]) -> int:
    """The largest multiple of 32 that fits the median image's short side, capped at 512."""
    side = int(np.median([min(h, w) for h, w in sizes]))
    if side < 32:
        raise UserError(f"training images are too small ({side} px on the short side); they must be at least "
                        "32 px, or pass --image-size with --resize")
    return min(512, side // 32 * 32)


def loss_weights(args: argparse.Namespace, labels: Labels, stats: ChannelStats
                 ) -> tuple[list[float] | None, float | None]:
    pixels = np.asarray(stats.class_pixels, np.float64)
    class_weights = pos_weight = None
    if args.class_weights == "auto":
        freq = pixels / pixels.sum()
        class_weights = np.clip(np.median(freq[freq > 0]) / np.maximum(freq, 1e-12), 0.1, 10).tolist()
    elif args.class_weights:
        try:
            class_weights = [float(v) for v in args.class_weights.split()]
        except ValueError:
            raise UserError(f"--class-weights '{args.class_weights}' must be numbers or auto") from None
        if len(class_weights) != labels.num_classes:
            raise UserError(f"--class-weights has {len(class_weights)} values; give one per class including "
                            f"background ({labels.num_classes}: {', '.join(labels.names)})")
    if args.pos_weight == "auto":
        pos_weight = float(min(10.0, pixels[0] / max(pixels[1:].sum(), 1)))
    elif args.pos_weight is not None:
        try:
            pos_weight = float(args.pos_weight)
        except ValueError:
            raise UserError(f"--pos-weight '{args.pos_weight}' must be a number or auto") from None
    return class_weights, pos_weight


OPTIMIZERS = {
    "adamw": lambda params, a: torch.optim.AdamW(params, lr=a.learning_rate, weight_decay=a.weight_decay),
    "adam": lambda params, a: torch.optim.Adam(params, lr=a.learning_rate, weight_decay=a.weight_decay),
    "sgd": lambda params, a: torch.optim.SGD(params, lr=a.learning_rate, momentum=0.9, nesterov=True,
                                             weight_decay=a.weight_decay),
}
# Learning-rate factor after warm-up, as a function of the run's progress 0..1; "plateau" instead halves the rate
# when the val score stalls for 5 epochs.
SCHEDULES = {
    "cosine": lambda progress: 0.5 * (1 + math.cos(math.pi * progress)),
    "poly": lambda progress: (1 - progress) ** 0.9,
    "none": lambda progress: 1.0,
    "plateau": None,
}


def make_optimizer(args: argparse.Namespace, model: torch.nn.Module) -> torch.optim.Optimizer:
    return OPTIMIZERS[args.optimizer](model.parameters(), args)


def make_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Per-step linear warm-up then the schedule; or per-epoch ReduceLROnPlateau on the val score."""
    if args.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=5)
    total = args.epochs * steps_per_epoch
    warmup = int(min(args.warmup_epochs * steps_per_epoch, total // 10))
    schedule = SCHEDULES[args.scheduler]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return schedule(min(1.0, (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def loader_options(workers: int, device: torch.device) -> dict:
    """DataLoader settings of the training and validation loaders: worker processes that stay alive between
    epochs and read ahead, one thread each, pinned memory for asynchronous copies to a GPU."""
    return {"num_workers": workers, "pin_memory": device.type == "cuda", "persistent_workers": workers > 0,
            "worker_init_fn": worker_init, "prefetch_factor": 4 if workers > 0 else None}


# ---------------------------------------------------------------------------------------------------- data
def scan(splits: dict[str, list], labels: Labels, workers: int) -> dict:
    """Check every file of every split once and measure the training set (exact channel stats, sizes)."""
    print(f"checking {sum(map(len, splits.values()))} samples ...", flush=True)
    t0 = time.monotonic()
    infos = {name: scan_samples(samples, with_stats=name == "train", workers=workers, desc=f"checking {name}")
             for name, samples in splits.items()}
    problems = []
    for name, split_infos in infos.items():
        problems += dataset_problems(split_infos, labels if name == "train" or labels.strict else None, name)
    train_ok = [i for i in infos["train"] if not i.error]
    layout = Counter((i.channels, i.dtype) for i in train_ok).most_common(1)[0][0] if train_ok else None
    if layout:
        for name, split_infos in infos.items():
            odd = [i.image for i in split_infos if not i.error and (i.channels, i.dtype) != layout]
            if name != "train" and odd:
                problems.append(f"{name}: {len(odd)} image(s) differ from the training images ({layout[0]} "
                                f"channels, {layout[1]}): {', '.join(odd[:4])}")
    if problems:
        head = f"{len(problems)} problems in the dataset:\n  " if len(problems) > 1 else ""
        raise UserError(head + "\n  ".join(problems))
    note = unlisted_note(infos["train"], labels)
    if note:
        print(note)
    return {"channels": layout[0], "dtype": layout[1],
            "stats": asdict(channel_stats(infos["train"], labels)),
            "sizes": {name: [(i.height, i.width) for i in split_infos] for name, split_infos in infos.items()},
            "seconds": round(time.monotonic() - t0, 2)}


# ---------------------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> int:
    check_flags(args)
    device = select_device(args.cpu, args.device)
    exp_name = args.exp_name or f"{architecture(args.model)}_{args.encoder}_{datetime.now():%Y%m%d-%H%M%S}"
    exp_dir = Path(args.log_dir) / exp_name
    ckpt = None
    if (exp_dir / "last.pth").exists():
        ckpt = load_checkpoint(exp_dir / "last.pth")
        args = resume_args(args, ckpt["meta"], exp_dir)
        done, saved_epochs = ckpt["epoch"], ckpt["meta"]["train_args"]["epochs"]
        if done >= args.epochs or (ckpt["early_stopped"] and args.epochs <= saved_epochs):
            how = "stopped early" if ckpt["early_stopped"] and done < args.epochs else f"{done}/{args.epochs} epochs"
            print(f"experiment {exp_dir} already finished ({how}, best val score {ckpt['best_score']:.4f} at epoch "
                  f"{ckpt['best_epoch']}); ask for more epochs with -e N to continue")
            return 0
    labels = Labels.from_args(args.class_list, args.max_mask_val, args.ignore_label) if ckpt is None else \
        Labels.from_meta(ckpt["meta"]["labels"])
    add_dirs = args.add_dirs.split()
    root = Path(args.dataset_dir)
    if not root.is_dir():
        raise UserError(f"-d {root}: dataset folder not found")
    val_dir = Path(args.val_dir) if args.val_dir else root / "val"
    eval_dirs = [] if args.use_only_add_val else [("val", val_dir)]
    if args.add_val_dirs:
        eval_dirs += read_add_val_list(args.add_val_dirs)
    if not val_dir.is_dir() and not args.use_only_add_val:
        raise UserError(f"{val_dir} not found: a dataset needs a val/ folder next to train/ (or pass -val DIR); "
                        "make one with python dataset_utils/split_dataset.py")
    splits = {"train": find_samples(root / "train", add_dirs)}
    splits.update({name: find_samples(folder, add_dirs) for name, folder in eval_dirs})
    workers = args.workers if args.workers is not None else default_workers(device)
    # The check of every file is cached in the experiment folder, keyed by the files' names, sizes and times.
    cache, key = exp_dir / "dataset_check.json", fingerprint([s for ss in splits.values() for s in ss]) + \
        json.dumps([labels.to_meta(), add_dirs])
    data = json.loads(cache.read_text(encoding="utf-8")) if cache.exists() else {}
    if data.get("key") != key:
        data = {"key": key, **scan(splits, labels, workers)}
    exp_dir.mkdir(parents=True, exist_ok=True)
    for stale in exp_dir.glob(".*.tmp"):  # left by a run killed while writing
        stale.unlink()
    write_text(cache, json.dumps(data))

    configure(device, args.deterministic)
    torch.manual_seed(args.seed)  # the model's initial weights
    if ckpt is None:
        stats = ChannelStats(**data["stats"])
        image_size = args.image_size or max(min_input_size(args.model), auto_image_size(data["sizes"]["train"]))
        model, weights_desc = build_model(args.model, args.encoder, data["channels"], labels.out_channels,
                                          args.encoder_weights)
        meta = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "arch": architecture(args.model),
                "encoder": args.encoder, "in_channels": data["channels"], "out_channels": labels.out_channels,
                "labels": labels.to_meta(), "class_names": labels.names, "add_dirs": add_dirs,
                "stats": asdict(stats), "dtype": data["dtype"], "image_size": image_size, "resize": args.resize,
                "val_tile_size": args.val_tile_size,
                "threshold": 0.5, "weights": weights_desc, "train_args": vars(args),
                "versions": {"segkit": SEGKIT_VERSION, "torch": str(torch.__version__),
                             "segmentation_models_pytorch": str(smp.__version__)},
                "created": datetime.now(UTC).isoformat(timespec="seconds")}
    else:
        meta = ckpt["meta"]
        meta["train_args"]["epochs"] = args.epochs
        stats = ChannelStats(**meta["stats"])
        image_size = meta["image_size"]
        model, _ = build_model(meta["arch"], meta["encoder"], meta["in_channels"], meta["out_channels"], "none")
        weights_desc = f"resumed from {exp_dir / 'last.pth'}"
    if data["channels"] != meta["in_channels"]:
        raise UserError(f"the images now have {data['channels']} channels but experiment {exp_dir} was trained "
                        f"with {meta['in_channels']}; use a new --exp-name")

    amp = amp_dtype(args.amp, device)
    channels_last = device.type in ("cuda", "cpu")  # measured faster on both (bench/RESULTS.md)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    rgb8 = data["channels"] == 3 and data["dtype"] == "uint8"
    loader_kw = loader_options(workers, device)
    caches = {name: RamCache(samples, labels.lut(), data["sizes"][name], data["channels"], data["dtype"], workers)
              for name, samples in splits.items()} if args.cache == "ram" else {}
    if caches:
        print(f"cache: {sum(c.nbytes for c in caches.values()) / 2 ** 20:.0f} MB of decoded images in shared memory")
    pad = any(h < image_size or w < image_size for h, w in data["sizes"]["train"])
    train_ds = SegmentationDataset(splits["train"], labels, stats,
                                   train_transform(args.aug, image_size, rgb8, args.resize, pad), caches.get("train"))
    train_loader = DataLoader(train_ds, batch_sampler=EpochBatchSampler(len(train_ds), args.batch_size, args.seed),
                              **loader_kw)
    eval_sets = [EvalSet(name, DataLoader(SegmentationDataset(splits[name], labels, stats, cache=caches.get(name)),
                                          batch_sampler=SizeGroupedBatchSampler(data["sizes"][name],
                                                                                args.batch_size), **loader_kw),
                         len(splits[name])) for name, _ in eval_dirs]
    class_weights, pos_weight = loss_weights(args, labels, stats)
    criterion = SegmentationLoss(args.loss, labels.binary, class_weights, pos_weight).to(device)
    optimizer = make_optimizer(args, model)
    scheduler = make_scheduler(args, optimizer, len(train_loader))
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    if args.compile:
        model = torch.compile(model)
    trainer = Trainer(model, criterion, optimizer, scheduler, scaler, train_loader, eval_sets, device, amp, exp_dir,
                      meta, labels.names, args.epochs, args.seed, args.patience, args.adv_freq, args.val_tile_size,
                      args.batch_size, args.log_worst, channels_last, min_input_size(meta["arch"]),
                      image_size if meta["resize"] else None)
    if ckpt is not None:
        trainer.load(ckpt)
        if ckpt["early_stopped"]:  # more epochs asked for after an early stop: patience starts afresh
            trainer.state.early_stopped, trainer.state.bad_epochs = False, 0

    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    sizes = ", ".join(f"{name} {len(s)}" for name, s in splits.items())
    bands = " + ".join(["image", *add_dirs])
    print(f"data: {sizes} images of {data['channels']} channels ({data['dtype']}; {bands}), classes "
          f"{', '.join(labels.names)} ({'binary, sigmoid' if labels.binary else 'softmax'}), "
          f"{'resized to' if args.resize else 'crops'} {image_size}, augmentation {args.aug}")
    print(f"model: {meta['arch']} / {meta['encoder']}, {n_params:.1f}M parameters, {weights_desc}")
    print(f"run: {device}{' amp ' + str(amp).replace('torch.', '') if amp else ''}, {workers} loader worker(s), "
          f"batch {args.batch_size}, {args.optimizer} lr {args.learning_rate:g} {args.scheduler}, loss {args.loss}")
    print(f"experiment: {exp_dir}" + (f" (resuming after epoch {ckpt['epoch']}/{args.epochs})" if ckpt else ""),
          flush=True)
    try:
        state = trainer.fit()
    except ValueError as e:
        if "Expected more than 1 value per channel" in str(e):
            raise UserError(f"-m {meta['arch']} cannot train on a batch of one sample (batch norm after global "
                            "pooling); use -b 2 or more") from None
        raise
    print(f"done: best val score {state.best_score:.4f} at epoch {state.best_epoch}; checkpoints in {exp_dir}")
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
