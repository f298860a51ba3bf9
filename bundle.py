"""The exported bundle: a folder holding model.onnx and segkit.json, the model's metadata as a checkpoint carries it.
One place says what a bundle is, writes its description and reads it back, checked against the graph it describes:
a segkit.json copied from another export (other bands, classes or input size) is named here, not by onnxruntime.
"""
import json
import time
from pathlib import Path

from checkpoint import SEGKIT_VERSION, ModelMeta
from errors import UserError
from fileio import read_json, write_text

FORMAT = "segkit-bundle"
META = "segkit.json"
MODEL = "model.onnx"
FILES = {MODEL, "model.onnx.data", META}  # what export.py writes: an --overwrite replaces these and nothing else


def bundle_folder(path: Path, flag: str = "-m") -> Path | None:
    """The bundle `path` names (its folder, model.onnx or segkit.json), or None where it names something else
    (a checkpoint, an experiment folder). An ONNX model without its segkit.json is an error: it cannot be used."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if (folder / META).is_file() and (path.is_dir() or path.suffix in (".onnx", ".json")):
        return folder
    if path.suffix == ".onnx" or (path.is_dir() and (path / MODEL).is_file()):
        raise UserError(f"{flag} {path}: an ONNX model without the {META} that export.py writes beside it; a bundle "
                        "is the whole folder export.py writes: export the model again (python export.py -m "
                        "best.pth -o BUNDLE)")
    return None


def write(folder: Path, meta: ModelMeta, precision: str, opset: int, fixed_size: int | None, min_size: int,
          versions: dict) -> None:
    """segkit.json for the model.onnx in `folder`."""
    info = {"format": FORMAT, "version": 1, "model": MODEL, "precision": precision, "opset": opset,
            "input": {"name": "image", "layout": "NCHW", "dtype": "float32",
                      "values": f"raw pixel values as the training images stored them ({meta.dtype}); the model "
                                "normalises them"},
            "output": {"name": "logits", "layout": "NCHW",
                       "activation": "sigmoid" if meta.binary else "softmax over the classes"},
            "min_size": min_size, "fixed_size": fixed_size,
            "classes": [{"name": n, "value": int(v)} for n, v in zip(meta.class_names,
                                                                       meta.labels.label_values(), strict=True)],
            "bands": ["image channels", *meta.add_dirs], "threshold": meta.threshold,
            "tile_size": meta.val_tile_size, "versions": {"segkit": SEGKIT_VERSION, **versions},
            "exported": time.strftime("%Y-%m-%dT%H:%M:%S"), "meta": meta.to_dict()}
    write_text(folder / META, json.dumps(info, indent=1))


def read(folder: Path) -> tuple[dict, ModelMeta]:
    """segkit.json of a bundle folder: the description and the model's metadata, or one error saying what is wrong."""
    path = Path(folder) / META
    info = read_json(path, "export the model again")
    if info.get("format") != FORMAT:
        raise UserError(f"{path}: not a segkit bundle description; export the model again with export.py")
    meta = ModelMeta.from_dict(info.get("meta"), str(path))
    name = info.setdefault("model", MODEL)
    if not isinstance(name, str) or Path(name).name != name or not isinstance(info.get("fixed_size") or 0, int):
        raise UserError(f"{path}: its 'model' or 'fixed_size' entry is damaged; export the model again")
    return info, meta


def check_graph(folder: Path, info: dict, meta: ModelMeta, inputs: list, outputs: list) -> None:
    """segkit.json against the ONNX graph's declared input and output (onnxruntime's NodeArgs): the same channels,
    classes and input size, else the two come from different exports."""
    fix = "the two files come from different exports: export the model again (or copy both files of one bundle)"
    where = f"{Path(folder) / META} and {Path(folder) / info.get('model', MODEL)}"
    if len(inputs) != 1 or len(inputs[0].shape) != 4 or not outputs or len(outputs[0].shape) != 4:
        raise UserError(f"{where}: the graph does not take one N x C x H x W image and give N x K x H x W logits; "
                        "it is not a segkit export: export the model again")
    shape, out = inputs[0].shape, outputs[0].shape
    bands = " + ".join(["image", *meta.add_dirs])
    if isinstance(shape[1], int) and shape[1] != meta.in_channels:
        raise UserError(f"{where} disagree: the description says {meta.in_channels} input channels ({bands}), the "
                        f"graph takes {shape[1]}; {fix}")
    if isinstance(out[1], int) and out[1] != meta.out_channels:
        raise UserError(f"{where} disagree: the description says {meta.out_channels} output(s) (classes "
                        f"{', '.join(meta.class_names)}), the graph gives {out[1]}; {fix}")
    fixed = info.get("fixed_size")
    if any(s != fixed if isinstance(s, int) else fixed for s in shape[2:]):
        raise UserError(f"{where} disagree: the description says input size {fixed or 'any'}, the graph takes "
                        f"{shape[2]} x {shape[3]}; {fix}")
