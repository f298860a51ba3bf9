"""Export a trained model to a self-contained ONNX bundle that predicts without PyTorch.

  python export.py -m logs/my_exp -o bundle/ --check
  python export.py -m logs/my_exp/best.pth -o bundle_int8/ --int8 --check
  python predict.py -m bundle/ -i images/ -o masks/          # works in a venv from requirements-infer.txt

The bundle folder holds model.onnx (input `image`: raw pixel values as stored, float32 N x C x H x W, any batch,
height and width; output `logits`: N x K x H x W; the model normalises itself) and segkit.json: classes and label
values, bands, normalisation, threshold, tile size, the training data's pixel type and range, versions.
--fp16 stores half-precision weights (for GPUs), --int8 quantises weights and activations with calibration images
(for CPUs). --check runs onnxruntime against PyTorch on real images and reports agreement and speed.
"""
import argparse
import errno
import logging
import time
import warnings
from pathlib import Path

import numpy as np

import bundle
from cli import Parser, at_least
from errors import UserError, require, run_cli
from fileio import as_disk_error, is_image_file, publish_folder, scratch_folder
from inference import Predictor

FIXED_STEP = 192  # fixed-size exports: a multiple of 32 x 6
CHECK_IMAGES = 8  # images (at most) for --check and --int8 calibration


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", required=True, help="best.pth / last.pth or an experiment folder (its best.pth)")
    g.add_argument("-o", "--output-dir", required=True, help="bundle folder to create (must be new or empty)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing bundle in --output-dir")
    g = p.add_argument_group("export")
    g.add_argument("--opset", type=at_least(17), default=18, help="ONNX opset (18)")
    precision = g.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="half-precision weights and compute (GPUs)")
    precision.add_argument("--int8", action="store_true",
                           help="8-bit weights and activations, calibrated on --images (CPUs)")
    g = p.add_argument_group("check")
    g.add_argument("--check", action="store_true",
                   help="compare onnxruntime with PyTorch on real images: probabilities, masks and speed")
    g.add_argument("--images", default=None,
                   help="folder with images/ (and the model's band folders) for --check and --int8 (default: the "
                        "training run's validation folder)")
    return p


# ------------------------------------------------------------------------------------------------------- export
def bundle_target(path: Path, overwrite: bool) -> Path:
    if path.exists() and not path.is_dir():
        raise UserError(f"-o {path} is a file; give a folder for the bundle")
    if path.is_dir() and any(path.iterdir()):
        ours = (path / bundle.META).is_file() and {p.name for p in path.iterdir()} <= bundle.FILES
        if not (ours and overwrite):
            why = "holds a bundle already: add --overwrite to replace it" if ours else \
                "is not empty and holds more than a bundle: choose a new folder"
            raise UserError(f"-o {path} {why}")
    return path


def export_onnx(model, meta, path: Path, opset: int) -> int | None:
    """model.onnx with dynamic batch, height and width: the TorchScript exporter (fast), else dynamo. Graphs that
    cannot take any size (adaptive pooling: pspnet, upernet) are exported for the tile size alone; returns that
    size, or None."""
    # Pyramid pooling (to 1, 2, 3 and 6 cells at stride 32) needs a side divisible by 192.
    fixed = meta.image_size if meta.resize else -(-meta.val_tile_size // FIXED_STEP) * FIXED_STEP
    errors = []
    for name, dynamo, size in (("torchscript", False, None), ("dynamo", True, None), ("fixed size", False, fixed)):
        try:
            _export(model, meta, path, opset, dynamo, size)
            if runs_at_sizes(path, model, meta, size):
                return size
            errors.append(f"{name}: onnxruntime's results differ from PyTorch's")
        except Exception as e:  # noqa: BLE001 -- the exporters raise many types; the message says which op failed
            if isinstance(disk := as_disk_error(path, e), OSError) and disk.errno == errno.ENOSPC:
                raise disk from None
            errors.append(f"{name}: {str(e).strip().splitlines()[0][:160]}")
    raise UserError(f"architecture {meta.arch} cannot be exported to ONNX ({'; '.join(errors)}); predict with the "
                    "checkpoint instead (predict.py -m best.pth)")


def _export(model, meta, path: Path, opset: int, dynamo: bool, size: int | None) -> None:
    import torch

    side = size or max(64, meta.image_size // 32 * 32)
    x = torch.rand(1, meta.in_channels, side, side) * float(max(meta.stats.max))
    axes = {0: "batch"} if size else {0: "batch", 2: "height", 3: "width"}
    kw = {"dynamic_shapes": {"x": {0: torch.export.Dim("batch", max=1024), 2: torch.export.Dim.AUTO,
                                   3: torch.export.Dim.AUTO}}} if dynamo else \
        {"dynamic_axes": {"image": axes, "logits": axes}}
    torch_log = logging.getLogger("torch")
    level = torch_log.level
    with warnings.catch_warnings():  # the exporters' deprecation, tracing and guard notes are not the user's
        warnings.simplefilter("ignore")
        torch_log.setLevel(logging.CRITICAL)
        try:
            torch.onnx.export(model, (x,), str(path), input_names=["image"], output_names=["logits"],
                              opset_version=opset, dynamo=dynamo, verbose=False, **kw)
        finally:
            torch_log.setLevel(level)


def runs_at_sizes(path: Path, model, meta, size: int | None) -> bool:
    """onnxruntime gives PyTorch's logits at other batch sizes, and other image sizes unless the size is fixed."""
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.log_severity_level = 4  # a graph that fails at some size is an answer here, not an error to print
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    shapes = ((2, size, size),) if size else ((2, 96, 160), (1, 224, 128))
    for n, h, w in shapes:
        x = torch.rand(n, meta.in_channels, h, w) * float(max(meta.stats.max))
        try:
            got = session.run(None, {"image": x.numpy()})[0]
        except Exception:  # noqa: BLE001 -- a shape the graph cannot take
            return False
        with torch.no_grad():
            want = model(x).numpy()
        if got.shape != want.shape or not np.allclose(got, want, atol=1e-3, rtol=1e-3):
            return False
    return True


def to_fp16(path: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(path)), keep_io_types=True), str(path))


def to_int8(path: Path, samples: list[np.ndarray]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"image": s[None].transpose(0, 3, 1, 2).astype(np.float32)} for s in samples])

        def get_next(self):
            return next(self.items, None)

    fp32 = path.with_name("fp32.onnx")
    path.rename(fp32)
    logging.disable(logging.WARNING)  # its advice to pre-process the graph first is for its own developers
    try:
        quantize_static(str(fp32), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)
    fp32.unlink()


def write_meta(folder: Path, meta, precision: str, opset: int, fixed_size: int | None) -> None:
    import onnx
    import onnxruntime
    import torch

    from model import min_input_size

    bundle.write(folder, meta, precision, opset, fixed_size, min_input_size(meta.arch),
                 {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__})


# ------------------------------------------------------------------------------------------------------- check
def check_images(args: argparse.Namespace, meta) -> list[np.ndarray]:
    """Up to CHECK_IMAGES real images (bands stacked) from --images or the training run's validation folder."""
    from dataset import find_samples, read_sample

    folder = Path(args.images) if args.images else None
    if folder is None:
        train = meta.train_args
        folder = Path(train["val_dir"]) if train.get("val_dir") else Path(train.get("dataset_dir", "")) / "val"
        if not (folder / "images").is_dir():
            raise UserError(f"the training run's validation folder {folder} is not here; give --images FOLDER (with "
                            "images/ and the model's band folders)")
    if not (folder / "images").is_dir() and (folder / "val" / "images").is_dir():
        folder = folder / "val"
    if not (folder / "images").is_dir():
        raise UserError(f"--images {folder}: no images/ folder in it")
    samples = find_samples(folder, meta.add_dirs, masks="optional")[:CHECK_IMAGES]
    return [read_sample(s, None)[0] for s in samples if is_image_file(s.image)]


def compare(model, meta, bundle: Path, images: list[np.ndarray], precision: str) -> tuple[bool, str]:
    """onnxruntime against the exported PyTorch model on the images: (passed, a report line)."""
    from inference import TorchRunner
    from model import min_input_size

    onnx_p = Predictor.load(bundle)
    # A fixed-size graph sees every image padded to its size: PyTorch gets the same input to compare like with like.
    torch_p = Predictor.create(meta, TorchRunner(model, "cpu"), min_input_size(meta.arch), tile_size=onnx_p.tile_size,
                               fixed_size=onnx_p.fixed_size)
    worst, same, total, seconds = 0.0, 0, 0, {"torch": 0.0, "onnx": 0.0}
    for image in images:
        results = {}
        for name, p in (("torch", torch_p), ("onnx", onnx_p)):
            t0 = time.perf_counter()
            results[name] = p.predict(image)
            seconds[name] += time.perf_counter() - t0
        worst = max(worst, float(np.abs(results["torch"].probs - results["onnx"].probs).max()))
        same += int((results["torch"].mask == results["onnx"].mask).sum())
        total += results["torch"].mask.size
    agree = same / max(total, 1)
    mpx = {k: total / 1e6 / max(v, 1e-9) for k, v in seconds.items()}
    passed = precision != "fp32" or (worst <= 1e-3 and agree >= 0.999)
    line = (f"check ({precision}, {len(images)} images): max probability difference {worst:.2e}, masks "
            f"{agree:.4%} identical; CPU speed onnxruntime {mpx['onnx']:.2f} Mpx/s, PyTorch {mpx['torch']:.2f} Mpx/s")
    return passed, line


def main() -> None:
    args = get_args_parser().parse_args()
    require("export.py", ("onnx", "onnxruntime"))
    import checkpoint
    from model import Segmenter, model_from_meta

    source = Path(args.model)
    if source.suffix != ".pth" and (source if source.is_dir() else source.parent).joinpath(bundle.META).is_file():
        raise UserError(f"-m {source} is an exported bundle already; export from the checkpoint it was made from "
                        "(best.pth or its experiment folder)")
    ckpt_path = checkpoint.find(source, "-m")
    if not ckpt_path.is_file():
        raise UserError(f"-m {ckpt_path}: not found; give a best.pth or an experiment folder")
    target = bundle_target(Path(args.output_dir), args.overwrite)
    ckpt = checkpoint.load(ckpt_path)
    meta = ckpt.meta
    precision = "fp16" if args.fp16 else "int8" if args.int8 else "fp32"
    images = check_images(args, meta) if args.check or args.int8 else []
    model = Segmenter(model_from_meta(meta, ckpt.model), meta.stats).eval()
    with scratch_folder(target) as tmp:
        fixed = export_onnx(model, meta, tmp / "model.onnx", args.opset)
        if args.fp16:
            to_fp16(tmp / "model.onnx")
        elif args.int8:
            to_int8(tmp / "model.onnx", images)
        write_meta(tmp, meta, precision, args.opset, fixed)
        passed, report = compare(model, meta, tmp, images, precision) if args.check else (True, "")
        if target.is_dir() and args.overwrite:  # only bundle files, as bundle_target made sure
            for name in bundle.FILES:
                (target / name).unlink(missing_ok=True)
        publish_folder(tmp, target)
    size = f"; input fixed at {fixed}x{fixed}, larger images are tiled" if fixed else ""
    print(f"exported {meta.arch}/{meta.encoder} ({precision}{size}) to {target}")
    if report:
        print(report)
    if not passed:
        raise SystemExit("error: the ONNX model disagrees with PyTorch beyond 1e-3 / 99.9 % (see above); please "
                         "report it with the architecture and encoder")


if __name__ == "__main__":
    run_cli(main)
