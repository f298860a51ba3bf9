"""validate.py end to end through its command line: a model trained once per module on tiny data."""
import csv
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import FAST, ROOT, assert_user_error, make_dataset, run_script

from fileio import read_image, write_image


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A binary model (RGB + nir) and a multi-class one, each trained for a few epochs."""
    root = tmp_path_factory.mktemp("validate")
    binary = make_dataset(root / "bin", n_train=8, n_val=4, bands=("nir",), size=(64, 64))
    multi = make_dataset(root / "multi", n_train=8, n_val=3, values=(1, 2, 5), size=(64, 64))
    for name, ds, extra in (("bin", binary, ["--add-dirs", "nir"]), ("multi", multi, ["--class-list", "1 2 5"])):
        r = run_script("train.py", "-d", ds, "-log", root / "logs", "--exp-name", name, *FAST, "-e", "4",
                       "--image-size", "64", "-lr", "3e-3", "-a", "none", *extra)
        assert r.returncode == 0, r.stderr
    return root


def validate(*args):
    return run_script("validate.py", "--cpu", "-w", "0", *args)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_binary_outputs_metrics_masks_plots(trained, tmp_path):
    out = tmp_path / "out"
    r = validate("-cd", trained / "logs" / "bin", "-d", trained / "bin" / "val", "-o", out, "--binary", "--plots",
                 "--raw")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("mIoU: ")
    m = json.loads((out / "metrics.json").read_text())
    assert {"miou", "per_class_iou", "f1", "precision", "recall", "accuracy", "confusion_matrix", "threshold",
            "checkpoint", "dataset", "images"} <= set(m)
    assert m["images"] == 4 and m["threshold"] == 0.5 and sum(map(sum, m["confusion_matrix"])) == 4 * 64 * 64
    rows = read_csv(out / "per_image.csv")
    assert [r["file"] for r in rows] and sorted(r["file"] for r in rows) == ["v000", "v001", "v002", "v003"]
    assert {"iou_0", "iou_255", "miou", "f1_255"} <= set(rows[0])
    for stem in ("v000", "v003"):
        mask = read_image(out / "masks" / f"{stem}.png")
        assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
        assert read_image(out / "raw" / f"{stem}.png").dtype == np.uint8
    assert len(list((out / "plots").glob("v00*_iou*.png"))) == 4 and (out / "worst.png").exists()
    # running again overwrites, never appends
    r = validate("-cd", trained / "logs" / "bin", "-d", trained / "bin" / "val", "-o", out, "--binary", "--plots",
                 "-t", "0.3")
    assert r.returncode == 0, r.stderr
    assert len(list((out / "plots").glob("*.png"))) == 4 and len(read_csv(out / "per_image.csv")) == 4
    assert not (out / "raw").exists() or not list((out / "raw").iterdir())


def test_default_settings_reproduce_the_training_val_miou(trained, tmp_path):
    r = validate("-cd", trained / "logs" / "bin", "-d", trained / "bin" / "val", "-o", tmp_path / "out", "--com")
    assert r.returncode == 0, r.stderr
    best = torch.load(trained / "logs" / "bin" / "best.pth", weights_only=True)
    miou = json.loads((tmp_path / "out" / "metrics.json").read_text())["miou"]
    assert miou == pytest.approx(best["score"], abs=1e-3)
    # -m takes the model as predict.py does; the experiment folder means its best.pth
    r = validate("-m", trained / "logs" / "bin", "-d", trained / "bin" / "val", "-o", tmp_path / "m", "--com")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "m" / "metrics.json").read_text())["miou"] == miou


def test_masks_reused_as_gt_score_perfectly(trained, tmp_path):
    out = tmp_path / "out"
    val = trained / "bin" / "val"
    r = validate("-cd", trained / "logs" / "bin", "-d", val, "-o", out, "--binary", "-t", "0.2")
    assert r.returncode == 0, r.stderr
    predicted = [read_image(p) for p in sorted((out / "masks").iterdir())]
    assert len(predicted) == 4 and any((m == 255).any() for m in predicted)  # the model does find foreground
    again = tmp_path / "again"
    shutil.copytree(val, again)
    shutil.rmtree(again / "gt")
    shutil.copytree(out / "masks", again / "gt")
    r = validate("-cd", trained / "logs" / "bin", "-d", again, "-o", tmp_path / "out2", "-t", "0.2")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "out2" / "metrics.json").read_text())
    assert m["accuracy"] == 1.0 and m["miou"] == 1.0 and "mIoU: 1.0000" in r.stdout


def test_geotiff_images_get_the_masks_predict_writes(trained, tmp_path):
    """One mask writer: a GeoTIFF val image gets a GeoTIFF mask with its georeference, equal to predict.py's."""
    import tifffile
    from conftest import GEO

    val = tmp_path / "val"
    shutil.copytree(trained / "bin" / "val", val)
    for folder in ("images", "nir"):
        for png in (val / folder).glob("v00[01].png"):
            tifffile.imwrite(png.with_suffix(".tif"), read_image(png), extratags=GEO)
            png.unlink()
    r = validate("-cd", trained / "logs" / "bin", "-d", val, "-o", tmp_path / "out", "--binary")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == ["v000.tif", "v001.tif", "v002.png",
                                                                            "v003.png"]
    r = run_script("predict.py", "-m", trained / "logs" / "bin", "-i", val / "images", "-o", tmp_path / "pred",
                   "--cpu")
    assert r.returncode == 0, r.stderr
    for name in ("v000.tif", "v002.png"):
        assert np.array_equal(read_image(tmp_path / "out" / "masks" / name), read_image(tmp_path / "pred" / name))
    with tifffile.TiffFile(tmp_path / "out" / "masks" / "v000.tif") as t:
        for code, _, _, value, _ in GEO:
            assert np.allclose(np.ravel(t.pages[0].tags[code].value), value)


def test_multiclass_masks_in_label_values_and_confusion_png(trained, tmp_path):
    out = tmp_path / "out"
    r = validate("-cd", trained / "logs" / "multi", "-d", trained / "multi" / "val", "-o", out, "--binary",
                 "--raw", "--raw-format", "tif")
    assert r.returncode == 0, r.stderr
    assert set(np.unique(read_image(out / "masks" / "v000.png"))) <= {0, 1, 2, 5}
    assert read_image(out / "raw" / "v000.tif").shape == (64, 64, 4)
    assert (out / "confusion_matrix.png").exists()
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["per_class_iou"]) == ["0", "1", "2", "5"] and m["threshold"] is None


def test_any_size_comes_back_at_its_size_with_tta(trained, tmp_path):
    ds = tmp_path / "big"
    (ds / "images").mkdir(parents=True)
    (ds / "nir").mkdir()
    rng = np.random.default_rng(0)
    for stem, (h, w) in {"odd": (300, 457), "small": (40, 50), "tile": (64, 64)}.items():
        write_image(ds / "images" / f"{stem}.png", rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        write_image(ds / "nir" / f"{stem}.png", rng.integers(0, 255, (h, w), dtype=np.uint8))
    r = validate("-cd", trained / "logs" / "bin", "-d", ds, "-o", tmp_path / "out", "--binary", "--tile-size", "64",
                 "--tta", "flip", "--plots")
    assert r.returncode == 0, r.stderr
    assert "no gt/ folder: predicting only" in r.stdout and not (tmp_path / "out" / "metrics.json").exists()
    assert read_image(tmp_path / "out" / "masks" / "odd.png").shape == (300, 457)
    assert read_image(tmp_path / "out" / "masks" / "small.png").shape == (40, 50)
    assert (tmp_path / "out" / "plots" / "odd.png").exists()


def test_constant_model_gives_a_seamless_constant_mask(trained, tmp_path):
    ckpt = torch.load(trained / "logs" / "bin" / "best.pth", weights_only=True)
    head = [k for k in ckpt["model"] if k.startswith("segmentation_head")]
    for k in head:
        ckpt["model"][k] = torch.zeros_like(ckpt["model"][k]) + (3.0 if k.endswith("bias") else 0.0)
    torch.save(ckpt, tmp_path / "constant.pth")
    ds = tmp_path / "big"
    (ds / "images").mkdir(parents=True)
    (ds / "nir").mkdir()
    write_image(ds / "images" / "a.png", np.random.default_rng(1).integers(0, 255, (300, 457, 3), dtype=np.uint8))
    write_image(ds / "nir" / "a.png", np.zeros((300, 457), np.uint8))
    r = validate("-c", tmp_path / "constant.pth", "-d", ds, "-o", tmp_path / "out", "--raw", "--raw-format", "tif",
                 "--tile-size", "64", "--binary")
    assert r.returncode == 0, r.stderr
    raw = read_image(tmp_path / "out" / "raw" / "a.tif")
    assert raw.shape == (300, 457) and np.allclose(raw, 1 / (1 + np.exp(-3.0)), atol=1e-5)
    assert (read_image(tmp_path / "out" / "masks" / "a.png") == 255).all()


def test_threshold_found_saved_and_reused(trained, tmp_path):
    ckpt = tmp_path / "model.pth"
    shutil.copy(trained / "logs" / "bin" / "best.pth", ckpt)
    r = validate("-c", ckpt, "-d", trained / "bin" / "val", "-o", tmp_path / "out", "--com", "--find-threshold",
                 "--save-threshold")
    assert r.returncode == 0, r.stderr
    best = float(r.stdout.split("best threshold ")[1].split(":")[0])
    assert "   0.50   " in r.stdout
    assert torch.load(ckpt, weights_only=True)["meta"]["threshold"] == pytest.approx(best)
    r = validate("-c", ckpt, "-d", trained / "bin" / "val", "-o", tmp_path / "out", "--com")
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["threshold"] == pytest.approx(best)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_checkpoints(trained, tmp_path):
    val = trained / "bin" / "val"
    assert_user_error(validate("-c", tmp_path / "none.pth", "-d", val), "none.pth", "not found")
    (tmp_path / "notes.pth").write_text("hello")
    assert_user_error(validate("-c", tmp_path / "notes.pth", "-d", val), "not a readable PyTorch checkpoint")
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    assert_user_error(validate("-c", tmp_path / "other.pth", "-d", val), "not a segkit checkpoint")
    assert_user_error(validate("-cd", tmp_path, "-d", val), "no best.pth")
    assert_user_error(validate("-m", tmp_path, "-d", val), "-m", "no best.pth")
    assert_user_error(validate("-m", trained / "logs" / "bin", "-cd", trained / "logs" / "bin", "-d", val),
                      "give the model once")
    for flag in ("-m", "-cd"):  # the log folder rather than an experiment in it
        assert_user_error(validate(flag, trained / "logs", "-d", val), f"{flag} {trained / 'logs'} holds 2 "
                          f"experiments (newest first: multi, bin); pass one, e.g. the one trained last: {flag} "
                          f"{trained / 'logs' / 'multi'}")
    r = validate("-cd", trained / "logs" / "bin" / "best.pth", "-d", val, "-o", tmp_path / "out", "--com")
    assert r.returncode == 0, r.stderr  # a checkpoint given to -cd is taken as -c takes it


def test_bad_datasets(trained, tmp_path):
    exp = trained / "logs" / "bin"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(validate("-cd", exp, "-d", empty), "images", "not found")
    loose = tmp_path / "loose"  # images straight in the folder
    shutil.copytree(trained / "bin" / "val" / "images", loose)
    assert_user_error(validate("-cd", exp, "-d", loose), f"-d {loose} holds images itself, not in an images/ folder",
                      f"predict.py -m MODEL -i {loose}")
    no_band = tmp_path / "no_band"
    shutil.copytree(trained / "bin" / "val", no_band)
    shutil.rmtree(no_band / "nir")
    assert_user_error(validate("-cd", exp, "-d", no_band), "nir", "not found")
    grey = tmp_path / "grey"
    shutil.copytree(trained / "bin" / "val", grey)
    write_image(grey / "images" / "v001.png", np.zeros((64, 64), np.uint8))
    assert_user_error(validate("-cd", exp, "-d", grey, "-o", tmp_path / "o1"), "v001", "trained on 4")
    odd = tmp_path / "odd"
    shutil.copytree(trained / "bin" / "val", odd)
    m = read_image(odd / "gt" / "v002.png")
    m[:2] = 7
    write_image(odd / "gt" / "v002.png", m)
    assert_user_error(validate("-cd", exp, "-d", odd, "-o", tmp_path / "o2"), "v002", "mask values 7")
    (tmp_path / "file").write_text("x")
    assert_user_error(validate("-cd", exp, "-d", trained / "bin" / "val", "-o", tmp_path / "file" / "out"),
                      "cannot write there")
    assert_user_error(validate("-cd", trained / "logs" / "multi", "-d", trained / "multi" / "val",
                               "--find-threshold"), "binary models")


def test_plots_with_equal_ious_in_one_batch(trained, tmp_path):
    """Identical images score identical IoUs; ranking them for worst.png must not compare the pictures."""
    val = tmp_path / "val"
    shutil.copytree(trained / "bin" / "val", val)
    for folder in ("images", "gt", "nir"):
        shutil.copy(val / folder / "v000.png", val / folder / "v000copy.png")
    r = validate("-cd", trained / "logs" / "bin", "-d", val, "-o", tmp_path / "out", "--plots", "-b", "5",
                 "--worst", "2")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "worst.png").exists() and len(list((tmp_path / "out" / "plots").iterdir())) == 5


def test_validate_sh_picks_the_experiment_trained_last(trained, tmp_path):
    """Not the one validated last: validating writes into an experiment and may rewrite its best.pth."""
    logs = tmp_path / "logs"
    shutil.copytree(trained / "logs", logs)
    now = time.time()
    os.utime(logs / "multi" / "last.pth", (now - 100, now - 100))
    os.utime(logs / "bin" / "last.pth", (now - 50, now - 50))
    (logs / "multi" / "predictions_bin_val").mkdir()  # as if multi had just been validated
    os.utime(logs / "multi" / "best.pth", (now, now))
    env = dict(os.environ, VENV="none", PYTHON=sys.executable, LOG_DIR=str(logs), DATASET=str(trained / "bin" / "val"),
               OUTPUTS="--com")
    r = subprocess.run(["bash", "validate.sh", "--cpu", "-w", "0"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert (logs / "bin" / "predictions_bin_val" / "metrics.json").exists()


def test_curves_of_a_metrics_csv_cut_mid_line(tmp_path):
    """A metrics.csv still being written (or a copy cut short): its incomplete last row is left out with a note; a
    damaged row before it is one error line."""
    exp = tmp_path / "exp"
    exp.mkdir()
    rows = "epoch,train_loss,val_loss,val_miou,score\n1,0.9,0.8,0.3,0.3\n2,0.7,0.6,0.5,0.5\n3,0.6,0.5"
    (exp / "metrics.csv").write_text(rows)
    r = run_script("visualize.py", "curves", exp)
    assert r.returncode == 0 and "last line is incomplete" in r.stdout and (exp / "curves.png").is_file(), r.stderr
    (exp / "metrics.csv").write_text(rows.replace("2,0.7", "2,0.\x00"))
    assert_user_error(run_script("visualize.py", "curves", exp), "metrics.csv: line 3 is damaged")
