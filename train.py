"""Train a segmentation model on a plain-folder dataset.

  python train.py -d data/sample --add-dirs nir                 # binary (mask values 0/255)
  python train.py -d my_data -m unet++ --encoder tu-convnext_tiny --class-list "1 2 5" -e 100 -a medium
  torchrun --nproc_per_node=4 train.py -d my_data -b 8          # 4 GPUs, 8 images each per step

Layout: <dataset>/train/{images,gt,<add-dirs>} and <dataset>/val/..., files paired by name.
Outputs go to <log-dir>/<exp-name>/: best.pth, last.pth, metrics.csv, TensorBoard events
(tensorboard --logdir=./logs). Running again with the same --exp-name resumes where it stopped.
"""
import argparse
import json
import os
import shlex
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from augmentations import PRESETS, auto_image_size
from budget import duration
from cli import Parser, add_runtime_flags, at_least, multiple_of_32, positive
from dataset import check_band_names, folder_label
from errors import UserError, run_cli, warn
from fileio import read_list
from losses import LOSS_NAMES
from optim import OPTIMIZERS, SCHEDULES

# Flags a resumed run may change; every other setting comes from the checkpoint.
RESUME_OVERRIDES = {"epochs", "workers", "cpu", "device", "dataset_dir", "val_dir", "add_val_dirs", "adv_freq",
                    "use_only_add_val", "log_dir", "exp_name", "patience", "amp", "val_tile_size", "log_worst",
                    "encoder_weights", "cache", "compile", "deterministic", "budget", "plan"}


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__)
    g = p.add_argument_group("data")
    g.add_argument("-d", "--dataset-dir", required=True,
                   help="dataset root holding train/ and val/, each with images/, gt/ and the --add-dirs folders")
    g.add_argument("-val", "--val-dir", help="validation folder with images/ and gt/ (default: DATASET_DIR/val)")
    g.add_argument("--add-dirs", default="", help='extra one-band folders stacked after the image channels, '
                                                  'e.g. "nir kv" (default: none)')
    g.add_argument("--add-val-dirs", metavar="FILE",
                   help="text file naming more validation folders, one per line; the best model is chosen on the "
                        "size-weighted mean mIoU of all val sets")
    g.add_argument("--adv-freq", type=at_least(1), default=1, help="evaluate the --add-val-dirs sets every N epochs")
    g.add_argument("--use-only-add-val", action="store_true",
                   help="skip the main val set; choose the best model on the --add-val-dirs sets")
    g.add_argument("--class-list", default=None,
                   help='mask values that are classes: "255" (default, binary), "1 2 5" (multi-class, 0 is '
                        "background); other values in the masks become background")
    g.add_argument("--max-mask-val", type=at_least(1), default=None, help="classes are mask values 1..N")
    g.add_argument("--class-names", default=None,
                   help='names of the classes, in --class-list order: "water", "building, road, bare land", or a '
                        ".txt file with one per line; shown wherever a class is (default: the label values)")
    g.add_argument("--ignore-label", type=at_least(0), default=None,
                   help="mask value whose pixels count in neither loss nor metrics (e.g. 254 for 'unknown')")
    g.add_argument("--image-size", type=multiple_of_32("--image-size"), default=None,
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
    g.add_argument("--budget", type=duration, default=None, metavar="DURATION",
                   help="train for this long, start to finish (90s, 20m, 1.5h): a plan from the data and the machine "
                        "chooses the crop, batch, loss, augmentation, steps and when to validate; flags you give win")
    g.add_argument("--plan", action="store_true", help="with --budget: print the plan and exit")
    g.add_argument("-e", "--epochs", type=at_least(1), default=50, help="epochs in all; more than done continues (50)")
    g.add_argument("--repeats", type=at_least(1), default=1,
                   help="passes over the training images per epoch, each with other crops (1; --budget plans it)")
    g.add_argument("-b", "--batch-size", type=at_least(1), default=8,
                   help="images per step (per process under torchrun) (8)")
    g.add_argument("--accum-steps", type=at_least(1), default=1,
                   help="add up the gradients of N batches before each optimizer step: an N times larger effective "
                        "batch in the same memory (1)")
    g.add_argument("-lr", "--learning-rate", type=positive, default=1e-3, help="peak learning rate (1e-3)")
    g.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZERS),
                   help="(adamw); lion wants a 3-10x smaller -lr (1e-4) and a larger --weight-decay (1e-3)")
    g.add_argument("--weight-decay", type=at_least(0, float), default=1e-4, help="(1e-4)")
    g.add_argument("--scheduler", default="cosine", choices=list(SCHEDULES),
                   help="learning-rate schedule, per step; plateau halves it when val mIoU stalls (cosine)")
    g.add_argument("--warmup-epochs", type=at_least(0, float), default=1.0,
                   help="linear warm-up, at most a tenth of the run (1)")
    g.add_argument("--loss", default="dice", choices=LOSS_NAMES, help="(dice)")
    g.add_argument("--pos-weight", default=None,
                   help="bce weight of foreground pixels, a number or 'auto' (background/foreground ratio, <= 10)")
    g.add_argument("--class-weights", default=None,
                   help='ce weight per class, "w0 w1 ..." (background first) or auto (median frequency)')
    g.add_argument("--patience", type=at_least(0), default=0,
                   help="stop after N epochs without a better val mIoU (0: off)")
    g.add_argument("--seed", type=at_least(0), default=42, help="seeds data order, augmentations and init (42)")

    g = p.add_argument_group("runtime")
    add_runtime_flags(g)
    g.add_argument("--cache", default="none", choices=["none", "ram"],
                   help="ram: decode every image once and keep it in shared memory (small datasets, slow decoding)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the training step (a minute of compiling first; faster steps on GPUs)")
    g.add_argument("--deterministic", action="store_true",
                   help="repeatable GPU results: deterministic kernels, no cuDNN autotuning (slower)")
    g.add_argument("--sync-bn", action="store_true",
                   help="under torchrun on GPUs: batch-norm statistics over the whole batch of every process")
    g.add_argument("--val-tile-size", type=multiple_of_32("--val-tile-size"), default=1024,
                   help="validation runs whole images; larger ones go in overlapping tiles of this size (1024)")

    g = p.add_argument_group("output")
    g.add_argument("-log", "--log-dir", default="logs", help="folder of experiments (logs)")
    g.add_argument("--exp-name", default=None,
                   help="experiment folder name; an existing one resumes (default: model_encoder_time)")
    g.add_argument("--log-worst", type=at_least(0), default=4,
                   help="val samples with the lowest IoU shown in TensorBoard each epoch (4)")
    return p


# -------------------------------------------------------------------------------------------- the experiment
def check_flags(args: argparse.Namespace) -> None:
    """Fail on flag combinations before any data is read (single values are checked by the parser)."""
    from model import architecture, check_encoder, min_input_size

    if args.use_only_add_val and not args.add_val_dirs:
        raise UserError("--use-only-add-val needs --add-val-dirs FILE")
    if args.plan and not args.budget:
        raise UserError("--plan shows the plan of a --budget run: give --budget too, e.g. --budget 20m --plan")
    if args.budget and "epochs" in given_flags():
        raise UserError("--budget and -e both set how long to train: give one (--budget plans the epochs)")
    check_band_names(args.add_dirs.split())
    architecture(args.model)
    check_encoder(args.encoder)
    smallest = min_input_size(args.model)
    if args.image_size is not None and args.image_size < smallest:
        raise UserError(f"-m {args.model} needs --image-size {smallest} or more")
    if args.sync_bn and (args.cpu or os.environ.get("WORLD_SIZE", "1") == "1"):
        raise UserError("--sync-bn is for torchrun on GPUs (batch norm over all processes); drop it here")


def experiment_dir(args: argparse.Namespace) -> Path:
    """<log-dir>/<exp-name>, checked: the log folder writable, the experiment a folder inside it."""
    from model import architecture

    log = Path(args.log_dir)
    existing = next(p for p in [log, *log.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise UserError(f"-log {log}: {existing} is a file, not a folder; choose a folder for the experiments")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"-log {log}: cannot write in {existing} (permission denied); choose another -log folder")
    name = args.exp_name or f"{architecture(args.model)}_{args.encoder}_{datetime.now():%Y%m%d-%H%M%S}"
    exp = log / name
    if Path(name).is_absolute() or log.resolve() not in exp.resolve().parents:
        raise UserError(f"--exp-name {name}: the experiment must be a folder inside -log {log}; give a plain name")
    if exp.exists() and not exp.is_dir():
        raise UserError(f"--exp-name {name}: {exp} is a file, not an experiment folder; choose another name")
    return exp


def open_experiment(args: argparse.Namespace, exp_dir: Path, procs):
    """(the settings to train with, the last.pth to resume from or None, whether it is finished already), as
    process 0 finds them: only its disk need hold the experiment, and no process can decide otherwise."""
    return procs.share(read_experiment(args, exp_dir) if procs.main else None)


def read_experiment(args: argparse.Namespace, exp_dir: Path):
    import checkpoint

    if not (exp_dir / "last.pth").exists():
        return args, None, False
    try:
        ckpt = checkpoint.load(exp_dir / "last.pth")
    except UserError as e:
        raise UserError(f"cannot resume experiment {exp_dir}: {e}. Start a new --exp-name (or remove that "
                        "last.pth to train this experiment from the start)") from None
    if ckpt.training is None:
        raise UserError(f"cannot resume experiment {exp_dir}: its last.pth holds no training state; start a new "
                        "--exp-name")
    args = resume_args(args, ckpt.meta.train_args, exp_dir)
    state = ckpt.training["state"]
    done, saved_epochs = ckpt.epoch, ckpt.meta.train_args["epochs"]
    if args.budget:  # the plan's epochs; the time left decides
        spent, args.epochs = state.get("elapsed_s", 0.0), max(saved_epochs, done + 1)
        finished = args.budget - spent < max(10.0, 0.05 * args.budget)
        if finished:
            print(f"experiment {exp_dir} used its budget ({spent:.0f} of {args.budget:.0f} s; best val score "
                  f"{state['best_score']:.4f} at epoch {state['best_epoch']}); give a larger --budget to continue")
        return args, ckpt, finished
    finished = done >= args.epochs or (state["early_stopped"] and args.epochs <= saved_epochs)
    if finished:
        how = "stopped early" if state["early_stopped"] and done < args.epochs else f"{done}/{args.epochs} epochs"
        print(f"experiment {exp_dir} already finished ({how}, best val score {state['best_score']:.4f} at epoch "
              f"{state['best_epoch']}); ask for more epochs with -e N to continue")
    return args, ckpt, finished


def as_flag(key: str, value) -> str:
    """A setting as the command line writes it: --add-dirs nir, --resize, no --class-list."""
    flag = f"--{key.replace('_', '-')}"
    if value is True:
        return flag
    return f"no {flag}" if value is None or value is False or value == "" else f"{flag} {shlex.quote(str(value))}"


def resume_args(args: argparse.Namespace, saved: dict, exp_dir: Path) -> argparse.Namespace:
    """The saved training settings, with the flags a resumed run may change taken from this command line; a flag
    that shapes the model (checkpoint.model_flags) refuses to change."""
    from checkpoint import model_flags

    model_set = model_flags()
    for key in model_set:
        if key == "image_size" and args.image_size is None:
            continue
        if key in saved and getattr(args, key) != saved[key]:
            raise UserError(f"experiment {exp_dir} was trained with {as_flag(key, saved[key])} and this command "
                            f"has {as_flag(key, getattr(args, key))}; use a new --exp-name, or the same setting to "
                            "resume")
    planned = saved.get("budget") and set(saved) - given_flags()  # a budget run's own choices are no one's flags
    changed = [f"--{k.replace('_', '-')} {getattr(args, k)} (saved {v})" for k, v in saved.items()
               if k not in RESUME_OVERRIDES and k not in model_set and hasattr(args, k) and getattr(args, k) != v
               and not (planned and k in planned)]
    if changed:
        print(f"note: resuming with the experiment's saved settings; ignoring {', '.join(changed)}")
    return argparse.Namespace(**{**vars(args), **{k: v for k, v in saved.items() if k not in RESUME_OVERRIDES}})


# ---------------------------------------------------------------------------------------------------- data
def read_add_val_list(path: str) -> list[tuple[str, Path]]:
    """(name, folder) for each line of an --add-val-dirs file; relative folders are relative to the file."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--add-val-dirs {path}: file not found (a text file with one folder per line)")
    sets, seen = [], {"val"}
    for line in read_list(file, "--add-val-dirs"):
        folder = Path(line) if Path(line).is_absolute() else file.parent / line
        name = "".join(c if c.isalnum() else "_" for c in folder_label(folder)) or "set"
        while name in seen:
            name += "_"
        seen.add(name)
        sets.append((name, folder))
    if not sets:
        raise UserError(f"--add-val-dirs {path} names no folder")
    return sets


ARCHIVES = (".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar")


def no_train_folder(root: Path) -> str:
    """Why -d, a folder without train/, is not a dataset: what it is instead and the -d to pass."""
    split = root.parent if root.name in ("images", "gt") else root
    if split.name in ("train", "val", "test") and (split / "images").is_dir():
        return f"-d {root} is a folder inside the dataset: pass the one that holds train/ and val/, -d {split.parent}"
    if (split / "images").is_dir():
        out = shlex.quote(f"{split}_split")
        who = f"-d {root}" if split == root else f"-d {root}: {split}"
        return (f"{who} holds images/ but is not split into train/ and val/; split it with python "
                f"dataset_utils/split_dataset.py {shlex.quote(str(split))} -o {out} --val 0.2, then pass -d {out}")
    inside = sorted(p.name + "/" for p in root.iterdir() if p.is_dir())
    return (f"-d {root}: no train/ folder in it (it holds {', '.join(inside[:6]) or 'no folders'}); a dataset is "
            "<root>/train/images, <root>/train/gt and the same under <root>/val")


def find_splits(args: argparse.Namespace) -> dict[str, list]:
    """The paired samples of train/ and of every val set, keyed by set name ("train", "val", extra sets)."""
    from dataset import find_samples

    root = Path(args.dataset_dir)
    if root.is_file():
        unpack = ": unpack it and pass the folder it holds" if root.suffix.lower() in ARCHIVES else ""
        raise UserError(f"-d {root} is a file, not a dataset folder{unpack}")
    if not root.is_dir():
        raise UserError(f"-d {root}: dataset folder not found")
    if not (root / "train").is_dir():
        raise UserError(no_train_folder(root))
    val_dir = Path(args.val_dir) if args.val_dir else root / "val"
    eval_dirs = [] if args.use_only_add_val else [("val", val_dir)]
    if args.add_val_dirs:
        eval_dirs += read_add_val_list(args.add_val_dirs)
    if not val_dir.is_dir() and not args.use_only_add_val:
        others = [p for p in sorted(root.iterdir()) if p.name != "train" and (p / "images").is_dir()]
        if not args.val_dir and others:
            raise UserError(f"{val_dir} not found, but {others[0]} holds images/: pass -val {others[0]}, or rename "
                            "it val/")
        raise UserError(f"{val_dir} not found: a dataset needs a val/ folder next to train/ (or pass -val DIR); "
                        "make one with python dataset_utils/split_dataset.py")
    for name, folder in eval_dirs:
        if folder.resolve() == (root / "train").resolve():
            warn(f"the {name} set is the training folder {folder}: its scores say nothing about new images")
    add_dirs = args.add_dirs.split()
    return {"train": find_samples(root / "train", add_dirs),
            **{name: find_samples(folder, add_dirs) for name, folder in eval_dirs}}


def check_data(args: argparse.Namespace, splits: dict, labels, exp_dir: Path, procs):
    """Every file checked and the training set measured, once per dataset (the check is cached in the log folder):
    under torchrun, process 0 reads the data while the others wait for its summary."""
    from checks import checked_splits, constant_channel_note, zero_listed_note
    from runtime import default_workers

    workers = args.workers if args.workers is not None else default_workers(procs.device, procs.world)
    data = None
    if procs.main:
        data = checked_splits(splits, labels, args.add_dirs.split(), Path(args.log_dir) / ".dataset-checks",
                              max(1, workers))
        for note in (zero_listed_note(labels, data.stats.class_pixels),
                     constant_channel_note(data.stats, args.add_dirs.split()), *data.warnings):
            if note:
                warn(note)
        exp_dir.mkdir(parents=True, exist_ok=True)  # the experiment folder appears once its data is sound
        for stale in exp_dir.glob(".*.tmp"):  # left by a run killed while writing
            stale.unlink()
    return procs.share(data), workers


# --------------------------------------------------------------------------------------------------- model
def make_model(args: argparse.Namespace, data, labels, resumed, procs):
    """The model on its device, and its metadata: new, or as the resumed experiment saved them."""
    import numpy as np
    import segmentation_models_pytorch as smp
    import torch

    from checkpoint import SEGKIT_VERSION, ModelMeta
    from model import architecture, build_model, min_input_size
    from runtime import channels_last

    torch.manual_seed(args.seed)  # the model's initial weights
    if resumed is not None:
        meta = replace(resumed.meta, train_args={**resumed.meta.train_args, "epochs": args.epochs})
        model, weights = build_model(meta)
        if data.channels != meta.in_channels or data.dtype != meta.dtype:
            raise UserError(f"the images are now {data.channels} channels of {data.dtype} but this experiment was "
                            f"trained on {meta.in_channels} of {meta.dtype}; use a new --exp-name")
        if not np.allclose(data.stats.mean + data.stats.std, meta.stats.mean + meta.stats.std, rtol=1e-6, atol=0):
            warn(f"-d {args.dataset_dir}: its training images are not those experiment {args.exp_name} started on "
                 "(their pixel statistics differ); it resumes with the first set's normalisation, and its best val "
                 "score so far was measured on the data it had then")
    else:
        meta = ModelMeta(arch=architecture(args.model), encoder=args.encoder, in_channels=data.channels,
                         out_channels=labels.out_channels, labels=labels, add_dirs=args.add_dirs.split(),
                         stats=data.stats, dtype=data.dtype, types=data.types,
                         image_size=args.image_size or max(min_input_size(args.model),
                                                           auto_image_size(data.sizes["train"])),
                         resize=args.resize, val_tile_size=args.val_tile_size, train_args=vars(args),
                         versions={"segkit": SEGKIT_VERSION, "torch": str(torch.__version__),
                                   "segmentation_models_pytorch": str(smp.__version__)},
                         created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        model, weights = build_model(meta, args.encoder_weights)
        meta = replace(meta, weights=weights)
    if args.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    memory = torch.channels_last if channels_last(procs.device) else torch.contiguous_format
    model.to(procs.device, memory_format=memory)
    if procs.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[procs.device.index] if procs.device.type == "cuda" else None)
    return model, meta, weights


def warn_large_images(sizes: list[tuple[int, int]], crop: int) -> None:
    """Training images far larger than the crop make few, slow steps: each epoch takes one crop per image, read
    from the whole image."""
    import numpy as np

    h, w = np.median(np.asarray(sizes), axis=0).astype(int)
    if h * w >= 64 * crop * crop:
        warn(f"the training images are {w}x{h} px (median), {h * w // (crop * crop)} times a {crop} px crop: an "
             "epoch takes one crop per image, each read from its whole image; tiles train faster and see more per "
             "epoch: make them with python dataset_utils/split_big_image_to_tiles.py (see its --help)")


def make_loaders(args: argparse.Namespace, splits: dict, data, meta, workers: int, procs):
    """The training stream and one evaluation loader per val set, all alive for the whole run."""
    from torch.utils.data import DataLoader

    from augmentations import train_transform
    from dataset import SegmentationDataset
    from loaders import EpochBatchSampler, RamCache, eval_loader, fit_shared_memory, largest_eval_batch, loader_options
    from trainer import EvalSet

    labels, size = meta.labels, meta.image_size
    caches = {name: RamCache(samples, labels.lut(), data.sizes[name], data.channels, data.dtype, workers)
              for name, samples in splits.items()} if args.cache == "ram" else {}
    if caches and procs.main:
        print(f"cache: {sum(c.nbytes for c in caches.values()) / 2 ** 20:.0f} MB of decoded images in shared memory")
    tile = None if meta.resize else meta.val_tile_size
    pixels = args.batch_size * size * size + sum(largest_eval_batch(data.sizes[name], args.batch_size, tile)
                                                 for name in splits if name != "train")
    workers, prefetch = fit_shared_memory(workers, pixels * procs.world, data.channels, data.dtype)
    pad = any(h < size or w < size for h, w in data.sizes["train"])
    transform = train_transform(args.aug, size, data.rgb8, meta.resize, pad)
    train_set = SegmentationDataset(splits["train"], labels, meta.stats, transform, caches.get("train"))
    sampler = EpochBatchSampler(len(train_set), args.batch_size, args.seed, rank=procs.rank, world=procs.world,
                                repeats=args.repeats)
    if len(sampler) == 0:
        raise UserError(f"{len(train_set)} training image(s) cannot be shared by {procs.world} processes; use fewer")
    train = DataLoader(train_set, batch_sampler=sampler, **loader_options(workers, procs.device, 10, prefetch))
    evals = [EvalSet(name, eval_loader(SegmentationDataset(samples, labels, meta.stats, cache=caches.get(name)),
                                       data.sizes[name], args.batch_size, tile, workers, procs.device, procs.rank,
                                       procs.world, repeat=True, prefetch=prefetch), len(samples))
             for name, samples in splits.items() if name != "train"]
    return train, evals


def train_config(args: argparse.Namespace, exp_dir: Path, procs, clock=None):
    from runtime import amp_dtype, channels_last, configure
    from trainer import TrainConfig

    configure(procs.device, args.deterministic)
    return TrainConfig(exp_dir=exp_dir, device=procs.device, epochs=args.epochs, amp=amp_dtype(args.amp, procs.device),
                       channels_last=channels_last(procs.device), compile=args.compile, seed=args.seed,
                       optimizer=args.optimizer, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
                       scheduler=args.scheduler, warmup_epochs=args.warmup_epochs, loss=args.loss,
                       class_weights=args.class_weights, pos_weight=args.pos_weight, accum_steps=args.accum_steps,
                       patience=args.patience, adv_freq=args.adv_freq, val_batch_size=args.batch_size,
                       log_worst=args.log_worst, rank=procs.rank, world=procs.world, clock=clock,
                       validations=getattr(args, "validations", None))


def describe(args: argparse.Namespace, splits: dict, data, meta, model, weights: str, cfg, workers: int,
             resumed) -> None:
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    sizes = ", ".join(f"{name} {len(s)}" for name, s in splits.items())
    labels = meta.labels
    print(f"data: {sizes} images of {data.channels} channels ({data.dtype}; {' + '.join(['image', *meta.add_dirs])}),"
          f" classes {', '.join(labels.names)} ({'binary, sigmoid' if labels.binary else 'softmax'}), "
          f"{'resized to' if meta.resize else 'crops'} {meta.image_size}, augmentation {args.aug}")
    print(f"model: {meta.arch} / {meta.encoder}, {n_params:.1f}M parameters, "
          + (f"resumed from {cfg.exp_dir / 'last.pth'}" if resumed else weights))
    amp = f" amp {str(cfg.amp).replace('torch.', '')}" if cfg.amp else ""
    procs = f" x {cfg.world} processes" if cfg.world > 1 else ""
    accum = f" x {cfg.accum_steps} accumulated" if cfg.accum_steps > 1 else ""
    print(f"run: {cfg.device}{amp}{procs}, {workers} loader worker(s), batch {args.batch_size}{accum}, "
          f"{args.optimizer} lr {args.learning_rate:g} {args.scheduler}, loss {args.loss}")
    print(f"experiment: {cfg.exp_dir}" + (f" (resuming after epoch {resumed.epoch}/{args.epochs})" if resumed
                                          else ""), flush=True)


# ---------------------------------------------------------------------------------------------------- the plan
def given_flags() -> set[str]:
    """The flags (argparse names) given on this command line, not left at their defaults: a plan keeps them."""
    parser = get_args_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(sys.argv[1:])))


def plan_data(args: argparse.Namespace, data, labels, procs, given: set[str]):
    """The choices the data and the machine make (process 0's, for every process), applied to args."""
    from budget import machine
    from plan import choose, fingerprint

    plan = procs.share(choose(fingerprint(data, labels), machine(procs.device), {k: vars(args)[k] for k in given})
                       if procs.main else None)
    apply_plan(args, plan)
    return plan


def plan_steps(args: argparse.Namespace, plan, data, labels, model, meta, procs, clock, given: set[str]):
    """Time real training steps (on a GPU first the largest batch that fits), then plan steps, epochs and
    augmentation for the time left; applied to args."""
    import plan as planning
    from budget import StepTimer, machine
    from losses import SegmentationLoss
    from model import Normalize, unwrap
    from optim import make_optimizer
    from runtime import amp_dtype

    if procs.main:
        fp, m, net = planning.fingerprint(data, labels), machine(procs.device), unwrap(model)
        probe = StepTimer(net, SegmentationLoss(args.loss, meta.binary), Normalize(meta.stats).to(procs.device),
                          make_optimizer(args.optimizer, net, args.learning_rate, args.weight_decay),
                          (meta.in_channels, meta.image_size, meta.image_size), max(2, meta.out_channels),
                          procs.device, amp_dtype(args.amp, procs.device))
        if m.device == "cuda" and "batch_size" not in given:
            planning.batch_from_probe(plan, m, probe.peaks(planning.PROBED_BATCHES), {})
        batch = plan.value("batch_size")
        clock.step_s = probe.seconds(batch) * 1.1  # and the loader's and the step's bookkeeping
        # A validation, until one is timed: a forward pass is about a third of a step, over every val pixel, with
        # half as much again for whole images and sliding windows, and a moment to start.
        clock.val_s = clock.step_s / 3 * fp.val_pixels / (batch * meta.image_size ** 2) * 1.5 + 0.5
        planning.schedule(plan, fp, clock.left() - clock.finish_s - 2.0, clock.step_s, clock.val_s,
                          {k: vars(args)[k] for k in given})
    plan = procs.share(plan if procs.main else None)
    apply_plan(args, plan)
    return plan


def show_plan(args: argparse.Namespace, plan, clock, exp_dir: Path) -> None:
    """The plan as a table on the console, and as plan.json in the experiment folder."""
    from budget import as_time
    from fileio import write_text

    start = clock.seconds - clock.left()
    if clock.left() - clock.finish_s < clock.step_s + clock.val_s:
        need = start + clock.finish_s + 10 * clock.step_s + clock.val_s
        raise UserError(f"--budget {as_time(args.budget)}: too short: start-up took {start:.0f} s, a training step "
                        f"takes ~{clock.step_s:.1f} s and a validation ~{clock.val_s:.1f} s here; give at least "
                        f"--budget {max(1, round(need))}s")
    print(f"plan for --budget {as_time(args.budget)} ({as_time(start)} spent starting up):\n{plan.table()}")
    write_text(exp_dir / "plan.json", json.dumps({"budget_s": args.budget, "startup_s": round(start, 2),
                                                  "step_s": clock.step_s, "val_s": clock.val_s,
                                                  "choices": plan.to_dict()}, indent=1, default=str))


def apply_plan(args: argparse.Namespace, plan) -> None:
    for name, choice in plan.choices.items():
        setattr(args, name, choice.value)


def write_args(args: argparse.Namespace, meta, exp_dir: Path) -> None:
    """args.json: every setting the run trains with (the plan's choices included), readable without segkit."""
    from fileio import write_text

    settings = {**vars(args), "image_size": meta.image_size, "model": meta.arch}
    write_text(exp_dir / "args.json", json.dumps(settings, indent=1, default=str))


def fit(trainer, meta):
    try:
        return trainer.fit()
    except KeyboardInterrupt:
        saved, exp = trainer.saved_epoch, trainer.cfg.exp_dir
        raise KeyboardInterrupt(f"interrupted: {exp / 'last.pth'} holds epoch {saved}; the same command resumes from "
                                "there" if saved else "interrupted before the first epoch was saved") from None
    except ValueError as e:
        if "Expected more than 1 value per channel" in str(e):
            sampler = trainer.train_loader.batch_sampler
            if sampler.size < 2 * sampler.world:  # one sample per process, whatever -b says
                raise UserError(f"the training set holds {sampler.size} sample(s), so its batches hold one, which -m "
                                f"{meta.arch} cannot train on (batch norm); add training images, or tile large ones "
                                "with dataset_utils/split_big_image_to_tiles.py") from None
            raise UserError(f"-m {meta.arch} cannot train on a batch of one sample (batch norm); use -b 2 or "
                            "more") from None
        raise


# ---------------------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> int:
    from budget import Clock
    from runtime import Processes, gc_paused, never_compiles

    if not args.compile and __name__ == "__main__":  # train.py's own process (the tests import it, and export)
        never_compiles()
    with gc_paused():
        from labels import Labels
        from trainer import Trainer

    check_flags(args)
    procs = Processes(args.cpu, args.device)
    try:
        exp_dir = procs.share(experiment_dir(args) if procs.main else None)  # process 0 alone writes there
        args, resumed, finished = open_experiment(args, exp_dir, procs)
        if finished:
            return 0
        labels = resumed.meta.labels if resumed else Labels.from_args(args.class_list, args.max_mask_val,
                                                                       args.ignore_label, args.class_names)
        splits = find_splits(args)
        data, workers = check_data(args, splits, labels, exp_dir, procs)
        given = given_flags() if args.budget and not resumed else set()
        plan = plan_data(args, data, labels, procs, given) if given else None
        model, meta, weights = make_model(args, data, labels, resumed, procs)
        clock = Clock(args.budget, resumed.training["state"].get("elapsed_s", 0.0) if resumed else 0.0) \
            if args.budget else None
        if plan is not None:
            plan = plan_steps(args, plan, data, labels, model, meta, procs, clock, given)
            if procs.main:
                show_plan(args, plan, clock, exp_dir)
            if args.plan:
                return 0
        if not meta.resize:
            warn_large_images(data.sizes["train"], meta.image_size)
        train_loader, eval_sets = make_loaders(args, splits, data, meta, workers, procs)
        trainer = Trainer(train_config(args, exp_dir, procs, clock), model, train_loader, eval_sets, meta)
        if resumed:
            trainer.resume(resumed)
        if procs.main:
            describe(args, splits, data, meta, model, weights, trainer.cfg, train_loader.num_workers, resumed)
            write_args(args, meta, exp_dir)
        state = fit(trainer, meta)
        if procs.main:
            print(f"done: best val score {state.best_score:.4f} at epoch {state.best_epoch}; checkpoints in {exp_dir}")
        return 0
    finally:
        procs.close()


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
