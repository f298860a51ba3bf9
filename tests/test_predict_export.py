"""predict.py and export.py through their command lines: masks for folders and GeoTIFF scenes, ONNX bundles."""
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import GEO, ROOT, assert_user_error, broken_package, make_checkpoint, make_dataset, run_script

from fileio import read_image, write_image
from inference import Predictor


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("p") / "ds", n_train=1, n_val=4, size=(48, 80), dtype=np.uint16,
                        bands=("nir",), ext=".tif")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("m") / "best.pth", add_dirs=("nir",))


def predict(*args):
    return run_script("predict.py", *args)


def test_folder_masks_named_like_images_in_label_values(tmp_path, data, ckpt):
    r = predict("-m", ckpt, "-i", data / "val" / "images", "-o", tmp_path / "out", "--prob", "uint8", "--overlay")
    assert r.returncode == 0, r.stderr
    assert "predicted 4 image(s)" in r.stdout
    predictor = Predictor.load(ckpt, device="cpu")
    for image in (data / "val" / "images").iterdir():
        mask = tifffile.imread(tmp_path / "out" / image.name)
        stacked = np.dstack([read_image(image), read_image(data / "val" / "nir" / image.name)])
        assert mask.shape == stacked.shape[:2] and set(np.unique(mask)) <= {0, 255}
        assert (mask == predictor.predict(stacked).mask).mean() > 0.999  # the one inference path
        prob = tifffile.imread(tmp_path / "out" / f"{image.stem}_prob.tif")
        assert prob.dtype == np.uint8 and prob.shape == mask.shape
        assert (tmp_path / "out" / f"{image.stem}_overlay.jpg").stat().st_size > 0


def test_skip_existing_finishes_a_stopped_run(tmp_path, data, ckpt):
    out, flags = tmp_path / "out", ["-m", ckpt, "-i", data / "val" / "images", "--prob", "uint8"]
    assert predict(*flags, "-o", out).returncode == 0
    (out / "v001.tif").unlink()  # a run stopped before v001, and before v002's probabilities
    (out / "v002_prob.tif").unlink()
    kept = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    assert_user_error(predict(*flags, "-o", out), "--skip-existing", "--overwrite")
    r = predict(*flags, "-o", out, "--skip-existing")
    assert r.returncode == 0, r.stderr
    assert "skipping 2 of 4" in r.stdout and "predicted 2 image(s)" in r.stdout
    again = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    assert {n: again[n] for n in ("v000.tif", "v000_prob.tif", "v003.tif", "v003_prob.tif")} == \
        {n: kept[n] for n in ("v000.tif", "v000_prob.tif", "v003.tif", "v003_prob.tif")}  # untouched
    assert {"v001.tif", "v001_prob.tif", "v002.tif", "v002_prob.tif"} <= set(again)
    r = predict(*flags, "-o", out, "--skip-existing")
    assert r.returncode == 0 and "skipping 4 of 4" in r.stdout and "predicted 0 image(s)" in r.stdout
    r = predict(*flags, "-o", out, "--skip-existing", "--overwrite")
    assert r.returncode == 2 and "not allowed with" in r.stderr


def test_geotiff_scene_streams_tiles_keeps_georeference_and_nodata(tmp_path, ckpt):
    rng = np.random.default_rng(1)
    (tmp_path / "s" / "images").mkdir(parents=True)
    (tmp_path / "s" / "nir").mkdir()
    image = rng.integers(0, 10000, (300, 410, 3), dtype=np.uint16)
    image[:40, :50] = 0  # nodata corner, in every band
    nir = rng.integers(0, 10000, (300, 410), dtype=np.uint16)
    nir[:40, :50] = 0
    tags = [*GEO, (42113, "s", 2, "0", True)]
    tifffile.imwrite(tmp_path / "s" / "images" / "scene.tif", image, tile=(128, 128), compression="zlib",
                     extratags=tags)
    tifffile.imwrite(tmp_path / "s" / "nir" / "scene.tif", nir, tile=(128, 128), compression="zlib", extratags=tags)
    r = predict("-m", ckpt, "-i", tmp_path / "s" / "images" / "scene.tif", "-o", tmp_path / "out", "-b", "3")
    assert r.returncode == 0, r.stderr
    with tifffile.TiffFile(tmp_path / "out" / "scene.tif") as t:
        page = t.pages[0]
        assert page.is_tiled and page.shape == (300, 410)
        for code, *_ in GEO:
            assert np.array_equal(np.ravel(page.tags[code].value), np.ravel(tifffile.TiffFile(
                tmp_path / "s" / "images" / "scene.tif").pages[0].tags[code].value))
        fill = int(page.tags[42113].value)
        mask = page.asarray()
    assert fill not in (0, 255) and (mask[:40, :50] == fill).all() and (mask[40:] != fill).all()
    whole = Predictor.load(ckpt, device="cpu", batch_size=3).predict(np.dstack([image, nir])).mask
    assert (mask[40:] == whole[40:]).mean() > 0.999  # streaming equals predicting the whole image at once


@pytest.mark.parametrize("batch", [None, 1])
def test_whole_images_go_in_batches_of_one_size_across_files(tmp_path, ckpt, batch):
    """Images up to the tile (64 px) share forward passes with the next ones of their size, in the pixels of -b
    tiles; a larger image between them slides; every mask is the image's own, nodata included. An input that cannot
    be predicted stops nothing: every other one gets its mask, then one error lists it."""
    import predict
    from scenes import Settings, predict_jobs

    rng = np.random.default_rng(2)
    sizes = {"a0": (48, 64), "a1": (48, 64), "a2": (48, 64), "b0": (32, 32), "b1": (32, 32), "c": (100, 90),
             "d0": (48, 64), "d1": (48, 64)}
    stacks = {}
    for folder in ("images", "nir"):
        (tmp_path / "in" / folder).mkdir(parents=True)
    for name, (h, w) in sizes.items():
        stacks[name] = rng.integers(1, 10000, (h, w, 4), dtype=np.uint16)
        stacks[name][:5, :7] = 0 if name == "a1" else 1  # nodata (--nodata 0) in one image of a batch
        write_image(tmp_path / "in" / "images" / f"{name}.tif", stacks[name][..., :3])
        write_image(tmp_path / "in" / "nir" / f"{name}.tif", stacks[name][..., 3])
    flags = ["-m", ckpt, "-i", tmp_path / "in" / "images", "-o", tmp_path / "out", "--nodata", "0"]
    args = predict.get_args_parser().parse_args(list(map(str, flags + (["-b", batch] if batch else []))))
    predictor = Predictor.load(ckpt, device="cpu", batch_size=batch, for_scenes=True)
    passes, forward = [], predictor.runner.forward
    predictor.runner.forward = lambda x: passes.append(x.shape[0]) or forward(x)
    settings = Settings(nodata=0)
    jobs = predict.plan_jobs(args, predictor.meta.add_dirs, predict.output_folder(tmp_path / "out", "-o"), settings)
    done = list(predict_jobs(predictor, jobs, settings))

    assert [(d.pixels, d.nodata) for d in done] == [(h * w, 35 if name == "a1" else 0) for name, (h, w) in
                                                    sizes.items()]
    assert [int(d.class_pixels.sum()) for d in done] == [h * w - (35 if name == "a1" else 0) for name, (h, w) in
                                                         sizes.items()]
    if batch is None:  # three, two, the sliding window's tiles, two
        assert passes[:2] == [3, 2] and passes[-1] == 2 and len(passes) > 3
    else:  # -b 1: one tile's pixels per pass, which two 32 x 32 images fill
        assert passes[:4] == [1, 1, 1, 2] and set(passes[4:]) == {1} and len(passes) > len(sizes)
    write_image(tmp_path / "in" / "images" / "e.tif", stacks["d1"][..., :2])  # two channels: refused
    write_image(tmp_path / "in" / "nir" / "e.tif", stacks["d1"][..., 3])
    r = run_script("predict.py", *flags[:4], "-o", tmp_path / "out2")
    assert_user_error(r, "1 of 9 input(s) could not be predicted", "e.tif", "channel", "--skip-existing")
    assert sorted(p.stem for p in (tmp_path / "out2").iterdir()) == sorted(sizes)  # every other input was written
    (tmp_path / "in" / "images" / "e.tif").unlink()  # fixed: the same command with --skip-existing finishes
    r = run_script("predict.py", *flags[:4], "-o", tmp_path / "out2", "--skip-existing")
    assert r.returncode == 0 and "skipping 8 of 8" in r.stdout, r.stdout + r.stderr
    damaged = tmp_path / "in" / "images" / "f.tif"
    tifffile.imwrite(damaged, stacks["d1"][..., :3], compression="zlib", tile=(16, 16))
    raw = bytearray(damaged.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 64] = bytes(64)
    damaged.write_bytes(bytes(raw))
    write_image(tmp_path / "in" / "nir" / "f.tif", stacks["d1"][..., 3])
    r = run_script("predict.py", *flags[:4], "-o", tmp_path / "out3")
    assert_user_error(r, "f.tif", "cannot be read", "corrupt")
    assert sorted(p.stem for p in (tmp_path / "out3").iterdir()) == sorted(sizes)
    single = Predictor.load(ckpt, device="cpu")
    for name, stack in stacks.items():
        mask = read_image(tmp_path / "out" / f"{name}.tif")
        expected = single.predict(stack).mask
        if name == "a1":
            assert (mask[:5, :7] != expected[:5, :7]).all()  # the nodata fill value
            mask, expected = mask[5:], expected[5:]
        assert mask.shape == expected.shape and (mask == expected).mean() > 0.999


@pytest.mark.parametrize("arch,encoder", [("unet", "resnet18"), ("unet++", "resnet18"), ("fpn", "resnet18"),
                                          ("deeplabv3+", "resnet18"), ("segformer", "mit_b0"),
                                          ("upernet", "resnet18")])
def test_export_bundle_agrees_with_pytorch(tmp_path, data, arch, encoder):
    ckpt = make_checkpoint(tmp_path / "best.pth", arch, encoder, values=(1, 2, 5), add_dirs=("nir",))
    r = run_script("export.py", "-m", ckpt, "-o", tmp_path / "bundle", "--check", "--images", data / "val")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "masks 100" in r.stdout or "masks 99.9" in r.stdout, r.stdout
    assert (tmp_path / "bundle" / "model.onnx").is_file() and (tmp_path / "bundle" / "segkit.json").is_file()
    fixed = json.loads((tmp_path / "bundle" / "segkit.json").read_text())["fixed_size"]
    assert (fixed is not None) == (arch == "upernet")  # its pyramid pooling takes one input size only
    r = predict("-m", tmp_path / "bundle", "-i", data / "val" / "images", "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    values = np.concatenate([tifffile.imread(p).ravel() for p in (tmp_path / "out").iterdir()])
    assert set(np.unique(values)) <= {0, 1, 2, 5}


@pytest.mark.parametrize("precision", ["--fp16", "--int8"])
def test_half_and_int8_bundles_report_their_agreement(tmp_path, data, ckpt, precision):
    r = run_script("export.py", "-m", ckpt, "-o", tmp_path / "b", precision, "--check", "--images", data / "val")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"check ({precision[2:]}" in r.stdout and "identical" in r.stdout and "Mpx/s" in r.stdout
    assert json.loads((tmp_path / "b" / "segkit.json").read_text())["precision"] == precision[2:]
    assert predict("-m", tmp_path / "b", "-i", data / "val" / "images", "-o", tmp_path / "out").returncode == 0
    r = run_script("export.py", "-m", tmp_path / "b", "-o", tmp_path / "again")
    assert_user_error(r, "is an exported bundle already", "best.pth")
    r = run_script("export.py", "-m", ckpt, "-o", tmp_path / "again", env=broken_package(tmp_path / "site", "onnx"))
    assert_user_error(r, "export.py needs onnx,", "pip install")


def test_a_list_file_as_windows_editors_save_it(tmp_path, data, ckpt):
    """-i list.txt: UTF-8 with a byte-order mark, CRLF, comments, a quoted path with a space; paths relative to it."""
    folder = tmp_path / "my scenes"
    shutil.copytree(data / "val", folder)
    listing = tmp_path / "list.txt"
    listing.write_bytes(f'\ufeff# to map\r\n"my scenes/images/v000.tif"\r\n\r\n{folder}/images/v002.tif\r\n'.encode())
    r = predict("-m", ckpt, "-i", listing, "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["v000.tif", "v002.tif"]
    listing.write_bytes("caf\xe9.tif\r\n".encode("cp1252"))
    assert_user_error(predict("-m", ckpt, "-i", listing, "-o", tmp_path / "out2"), "not UTF-8 text")


def test_export_refuses_a_folder_that_holds_other_files(tmp_path, ckpt):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    assert_user_error(run_script("export.py", "-m", ckpt, "-o", tmp_path / "b"), "-o", "not empty")
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("how,needles", [
    ("not a model", ["model.pth", "not a readable PyTorch checkpoint"]),
    ("missing band", ["nir", "--band nir="]),
    ("wrong bands", ["channel", "trained on 4"]),
    ("wrong pixel type", ["float32", "uint16"]),
    ("output is a file", ["-o", "a file"]),
    ("outputs exist", ["--overwrite"]),
    ("output is the input folder", ["the masks would replace input images"]),
    ("a split folder", ["no image files in this folder; image folders below it:", "e.g. -i ", "/val/images"]),
    ("dead links", ["zz_a.tif: is a link to /media/usb/a.tif, which does not exist", "1 more link(s)"]),
    ("dead band link", ["nir/v001.tif: is a link to /media/usb/nir.tif, which does not exist"]),
])
def test_bad_input_gets_one_clear_error_before_work(tmp_path, data, ckpt, how, needles):
    out, images, model = tmp_path / "out", data / "val" / "images", ckpt
    if how == "not a model":
        model = tmp_path / "model.pth"
        model.write_bytes(b"not a checkpoint")
    elif how == "missing band":
        images = tmp_path / "x" / "images"
        images.mkdir(parents=True)
        write_image(images / "a.tif", np.zeros((40, 40, 3), np.uint16))
    elif how == "wrong bands":
        images = tmp_path / "x" / "images"
        images.mkdir(parents=True)
        write_image(images / "a.tif", np.zeros((40, 40, 2), np.uint16))
        (tmp_path / "x" / "nir").mkdir()
        write_image(tmp_path / "x" / "nir" / "a.tif", np.zeros((40, 40), np.uint16))
    elif how == "wrong pixel type":
        images = tmp_path / "x" / "images"
        images.mkdir(parents=True)
        write_image(images / "a.tif", np.full((40, 40, 3), 1e6, np.float32))
        (tmp_path / "x" / "nir").mkdir()
        write_image(tmp_path / "x" / "nir" / "a.tif", np.full((40, 40), 1e6, np.float32))
    elif how == "output is a file":
        out.write_text("x")
    elif how == "outputs exist":
        out.mkdir()
        (out / "v000.tif").write_text("mine")
    elif how == "a split folder":  # its images/ inside
        images = data / "val"
    elif how == "output is the input folder":
        shutil.copytree(data / "val", tmp_path / "x")
        images = out = tmp_path / "x" / "images"
    elif how.startswith("dead"):  # a drive not mounted, git-annex files not fetched
        shutil.copytree(data / "val", tmp_path / "x")
        images = tmp_path / "x" / "images"
        if how == "dead links":
            (images / "zz_a.tif").symlink_to("/media/usb/a.tif")
            (images / "zz_b.tif").symlink_to("/media/usb/b.tif")
        else:
            (tmp_path / "x" / "nir" / "v001.tif").unlink()
            (tmp_path / "x" / "nir" / "v001.tif").symlink_to("/media/usb/nir.tif")
    r = predict("-m", model, "-i", images, "-o", out)
    assert_user_error(r, *needles)
    if how == "output is the input folder":
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (data / "val" / "images").iterdir())
        assert all(p.read_bytes() == (data / "val" / "images" / p.name).read_bytes() for p in out.iterdir())
    else:
        assert not out.is_dir() or how == "outputs exist" or not list(out.iterdir())  # stopped before any work
    if how == "outputs exist":
        assert (out / "v000.tif").read_text() == "mine"


def test_a_large_scene_that_does_not_fit_stops_the_run_before_any_prediction(tmp_path, data, ckpt):
    images = tmp_path / "in" / "images"
    shutil.copytree(data / "val", tmp_path / "in")
    write_image(images / "zz_scene.tif", np.zeros((2100, 2100, 2), np.uint16), compression=None)  # > 16 MB
    write_image(tmp_path / "in" / "nir" / "zz_scene.tif", np.zeros((2100, 2100), np.uint16), compression=None)
    assert_user_error(predict("-m", ckpt, "-i", images, "-o", tmp_path / "out"), "zz_scene.tif", "3 channel(s)")
    assert not list((tmp_path / "out").iterdir())  # the small images before it were not predicted either


def test_bundle_predicts_without_torch(tmp_path, data, ckpt):
    """predict.py -m BUNDLE imports no torch: here with torch made unimportable, and in a venv built from
    requirements-infer.txt when the package index is reachable."""
    assert run_script("export.py", "-m", ckpt, "-o", tmp_path / "bundle").returncode == 0
    block = ("import sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; import runpy; "
             "runpy.run_path(sys.argv[0], run_name='__main__')")
    args = [str(ROOT / "predict.py"), "-m", str(tmp_path / "bundle"), "-i", str(data / "val" / "images")]
    r = subprocess.run([sys.executable, "-c", block, *args, "-o", str(tmp_path / "a")], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "a").glob("*.tif"))) == 4
    assert predict("-m", ckpt, "-i", data / "val" / "images", "-o", tmp_path / "torch").returncode == 0
    same = [(tifffile.imread(p) == tifffile.imread(tmp_path / "torch" / p.name)).mean()
            for p in (tmp_path / "a").glob("*.tif")]
    assert min(same) >= 0.999  # the bundle's masks are the checkpoint's
    venv = infer_venv()
    r = subprocess.run([str(venv / "bin" / "python"), *args, "-o", str(tmp_path / "b")], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    for p in (tmp_path / "a").glob("*.tif"):
        assert np.array_equal(tifffile.imread(p), tifffile.imread(tmp_path / "b" / p.name))


def infer_venv() -> Path:
    """A venv from requirements-infer.txt (cached by its hash); skips where no package index can be reached."""
    req = ROOT / "requirements-infer.txt"
    venv = Path(tempfile.gettempdir()) / f"segkit-infer-{hashlib.sha1(req.read_bytes()).hexdigest()[:10]}"
    if not (venv / "ok").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            "-r", str(req)], capture_output=True, text=True, env=dict(os.environ, PIP_NO_INPUT="1"))
        if r.returncode != 0:
            pytest.skip(f"pip could not install requirements-infer.txt here: {r.stderr.strip()[-160:]}")
        (venv / "ok").touch()
    assert subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"], capture_output=True).returncode != 0
    return venv


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, ckpt) -> Path:
    folder = tmp_path_factory.mktemp("b") / "bundle"
    assert run_script("export.py", "-m", ckpt, "-o", folder).returncode == 0
    return folder


def edited(info: dict, how: str) -> dict | str:
    """segkit.json as a user's copy or edit makes it: from another export, or cut off."""
    meta = info["meta"]
    if how == "other bands":
        meta.update(in_channels=5, add_dirs=["nir", "kv"])
    elif how == "other classes":
        meta.update(out_channels=3, labels={**meta["labels"], "values": [1, 2]})
    elif how == "other input size":
        info["fixed_size"] = 192
    elif how == "cut off":
        return json.dumps(info)[:300]
    return info


@pytest.mark.parametrize("how,needles", [
    ("other bands", ["disagree", "5 input channels (image + nir + kv)", "graph takes 4", "export the model again"]),
    ("other classes", ["disagree", "3 output(s)", "graph gives 1", "export the model again"]),
    ("other input size", ["disagree", "input size 192", "export the model again"]),
    ("cut off", ["segkit.json: not complete JSON", "export the model again"]),
    ("no segkit.json", ["without the segkit.json", "export the model again"]),
    ("model.onnx alone", ["model.onnx: an ONNX model without the segkit.json"]),
])
def test_a_bundle_whose_parts_disagree_is_named_before_onnxruntime_runs(tmp_path, data, bundle, how, needles):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    info = json.loads((copy / "segkit.json").read_text())
    if how in ("no segkit.json", "model.onnx alone"):
        (copy / "segkit.json").unlink()
    else:
        new = edited(info, how)
        (copy / "segkit.json").write_text(new if isinstance(new, str) else json.dumps(new))
    model = copy / "model.onnx" if how == "model.onnx alone" else copy
    for script in ("predict.py", "validate.py"):
        flags = ["-i", data / "val" / "images", "-o", tmp_path / "out"] if script == "predict.py" else \
            ["-d", data / "val", "-o", tmp_path / "v"]
        out = assert_user_error(run_script(script, "-m", model, *flags), *needles)
        assert "onnxruntime" not in out.lower() and "Traceback" not in out


def test_choices_made_for_the_user_are_said(tmp_path, data, ckpt):
    """An experiment without best.pth predicts from last.pth, masks going beside their input images, and a TIFF of
    several differing images predicted from its first: each said in one line."""
    (tmp_path / "exp").mkdir()
    shutil.copy(ckpt, tmp_path / "exp" / "last.pth")
    r = predict("-m", tmp_path / "exp", "-i", data / "val" / "images", "-o", tmp_path / "out")
    assert r.returncode == 0 and "note: " in r.stdout and "has no best.pth" in r.stdout and "using last.pth" in \
        r.stdout, r.stdout + r.stderr
    jpg = tmp_path / "x" / "images"
    jpg.mkdir(parents=True)
    write_image(jpg / "a.png", np.zeros((40, 40, 3), np.uint8))
    bundle_meta = tmp_path / "m8.pth"
    make_checkpoint(bundle_meta, dtype="uint8")
    r = predict("-m", bundle_meta, "-i", jpg, "-o", jpg.parent / "images_masks")
    assert r.returncode == 0 and "warning" not in r.stderr
    shutil.copy(jpg / "a.png", jpg / "b.jpg")
    (jpg / "a.png").unlink()
    r = predict("-m", bundle_meta, "-i", jpg, "-o", jpg)  # b.jpg -> b.png beside it
    assert r.returncode == 0 and "warning: -o" in r.stderr and "is the folder of the input images" in r.stderr
    pages = tmp_path / "p" / "images"
    pages.mkdir(parents=True)
    with tifffile.TiffWriter(pages / "two.tif") as w:
        w.write(np.zeros((40, 40, 3), np.uint8), photometric="rgb")
        w.write(np.zeros((20, 30), np.uint8))
    r = predict("-m", bundle_meta, "-i", pages, "-o", tmp_path / "p_out")
    assert r.returncode == 0 and "two.tif holds 2 images of different sizes or types; predicting the first" in \
        r.stderr, r.stderr
    assert read_image(tmp_path / "p_out" / "two.tif").shape == (40, 40)


def test_damaged_georeference_and_nodata_tags_are_left_out_with_a_warning(tmp_path, ckpt):
    scene = tmp_path / "in" / "images"
    scene.mkdir(parents=True)
    (tmp_path / "in" / "nir").mkdir()
    image = np.random.default_rng(0).integers(1, 10000, (100, 90, 3), dtype=np.uint16)
    tags = [(33550, "H", 3, (10, 10, 0), True), (42113, "s", 0, "abc", True)]  # pixel scale as SHORT: foreign
    tifffile.imwrite(scene / "s.tif", image, extratags=tags, photometric="rgb")
    write_image(tmp_path / "in" / "nir" / "s.tif", image[..., 0])
    r = predict("-m", ckpt, "-i", scene, "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "ModelPixelScale tag(s) are damaged or of an unexpected type" in r.stderr
    assert "GDAL_NODATA tag 'abc' is not a number" in r.stderr
    with tifffile.TiffFile(tmp_path / "out" / "s.tif") as t:
        assert 33550 not in t.pages[0].tags and t.pages[0].shape == (100, 90)


def test_shards_and_torchrun_predict_each_input_once_as_one_process_does(tmp_path, data, ckpt):
    images = data / "val" / "images"
    ref = predict("-m", ckpt, "-i", images, "-o", tmp_path / "one", "--cpu")
    assert ref.returncode == 0, ref.stderr
    stems = sorted(p.stem for p in images.iterdir())
    masks = {p.stem: tifffile.imread(p) for p in (tmp_path / "one").iterdir()}
    counts = []
    for k in (1, 2):  # two job-array tasks into one folder: no --overwrite needed
        r = predict("-m", ckpt, "-i", images, "-o", tmp_path / "shards", "--cpu", "--shard", f"{k}/2")
        assert r.returncode == 0, r.stderr
        counts.append(len(list((tmp_path / "shards").iterdir())))
    assert 0 < counts[0] < len(stems) == counts[1]
    for p in (tmp_path / "shards").iterdir():
        assert np.array_equal(tifffile.imread(p), masks[p.stem])
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
                        str(ROOT / "predict.py"), "-m", str(ckpt), "-i", str(images), "-o", str(tmp_path / "two"),
                        "--cpu"], capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (r.stdout + r.stderr).count("predicted 4 image(s)") == 1  # once, for every process's work
    assert sorted(p.stem for p in (tmp_path / "two").iterdir()) == stems
    for p in (tmp_path / "two").iterdir():
        assert np.array_equal(tifffile.imread(p), masks[p.stem])


def test_uncertainty_ranks_the_images_to_label_next(tmp_path, data, ckpt):
    r = predict("-m", ckpt, "-i", data / "val" / "images", "-o", tmp_path / "u", "--uncertainty",
                "--uncertainty-maps")
    assert r.returncode == 0 and "ranked by uncertainty" in r.stdout, r.stderr
    with open(tmp_path / "u" / "uncertainty.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [Path(row["image"]).stem for row in rows] != [] and len(rows) == 4
    scores = [float(row["uncertainty"]) for row in rows]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert {"uncertain_pixels", "share_0", "share_255"} <= set(rows[0])
    assert abs(sum(float(rows[0][k]) for k in ("share_0", "share_255")) - 1) < 1e-4
    first = Path(rows[0]["image"]).stem
    heat = tifffile.imread(tmp_path / "u" / f"{first}_uncertainty.tif")
    assert heat.dtype == np.uint8 and heat.shape == (48, 80)
    assert abs(heat.mean() / 255 - scores[0]) < 0.01  # the map is the score's pixels


def test_uncertainty_of_a_bundle_ranks_as_its_checkpoint(tmp_path, data, ckpt, bundle):
    ranked = {}
    for name, model in (("ckpt", ckpt), ("bundle", bundle)):
        r = predict("-m", model, "-i", data / "val" / "images", "-o", tmp_path / name, "--uncertainty", "--cpu")
        assert r.returncode == 0, r.stderr
        with open(tmp_path / name / "uncertainty.csv", newline="") as f:
            ranked[name] = [(Path(row["image"]).name, float(row["uncertainty"])) for row in csv.DictReader(f)]
    assert [n for n, _ in ranked["ckpt"]] == [n for n, _ in ranked["bundle"]]
    assert np.allclose([u for _, u in ranked["ckpt"]], [u for _, u in ranked["bundle"]], atol=1e-3)


def test_torchrun_with_more_processes_than_inputs(tmp_path, data, ckpt):
    image = sorted((data / "val" / "images").iterdir())[0]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "predict.py"), "-m", str(ckpt), "-i", str(image), "-o", str(tmp_path / "o"),
                        "--cpu", "--uncertainty"], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (r.stdout + r.stderr).count("predicted 1 image(s)") == 1
    assert {p.name for p in (tmp_path / "o").iterdir()} == {image.name, "uncertainty.csv"}


@pytest.mark.parametrize("value,needle", [("3/2", "1 <= K <= N"), ("0/0", "1 <= K <= N"), ("a/b", "is not K/N")])
def test_bad_shards_are_one_line(tmp_path, data, ckpt, value, needle):
    assert_user_error(predict("-m", ckpt, "-i", data / "val" / "images", "-o", tmp_path / "x", "--shard", value),
                      "--shard", needle)
