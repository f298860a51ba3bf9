"""torchrun: two CPU processes (gloo) train, resume and validate as one process would, and a mistake ends the job
with one error line."""
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import ROOT, make_dataset

SAMPLE = ROOT / "data" / "sample"
FLAGS = ["--cpu", "-w", "0", "--encoder", "resnet18", "--encoder-weights", "none", "--image-size", "64", "-b", "2"]


def run(*args, launcher: tuple[str, ...] = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"),
        env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, *launcher, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def sample_subset(dst: Path, n: dict[str, int]) -> Path:
    """The first images of the bundled sample (RGB + NIR water tiles), linked."""
    for split, count in n.items():
        stems = sorted(p.stem for p in (SAMPLE / split / "images").iterdir())[:count]
        for folder in ("images", "nir", "gt"):
            (dst / split / folder).mkdir(parents=True)
            for f in (SAMPLE / split / folder).iterdir():
                if f.stem in stems:
                    (dst / split / folder / f.name).symlink_to(f)
    return dst


def test_torchrun_trains_resumes_and_prints_once(tmp_path):
    ds = sample_subset(tmp_path / "ds", {"train": 8, "val": 3})
    cmd = ["train.py", "-d", ds, "--add-dirs", "nir", *FLAGS, "--accum-steps", "2", "-log", tmp_path / "logs",
           "--exp-name", "ddp"]
    r = run(*cmd, "-e", "2")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "cpu x 2 processes" in out and "x 2 accumulated" in out
    for epoch in (1, 2):
        assert sum(ln.lstrip().startswith(f"epoch {epoch}/2 ") and "val_mIoU" in ln for ln in out.splitlines()) == 1
    exp = tmp_path / "logs" / "ddp"
    assert (exp / "best.pth").is_file()
    import torch

    # 8 images, 2 processes of batch 2: 2 batches each per epoch, 2 accumulated into 1 optimizer step.
    training = torch.load(exp / "last.pth", weights_only=False)["training"]
    assert training["scheduler"]["last_epoch"] == 2
    r = run(*cmd, "-e", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming after epoch 2/3" in r.stdout
    assert [int(row["epoch"]) for row in csv.DictReader((exp / "metrics.csv").read_text().splitlines())] == [1, 2, 3]


def test_two_processes_score_the_single_process_confusion_matrix(tmp_path):
    """Val images of two sizes, an odd count: the processes' shares differ in size and shape, the sum may not."""
    ds = make_dataset(tmp_path / "ds", n_train=4, n_val=5, size=(64, 64), values=(1, 2))
    odd = make_dataset(tmp_path / "odd", n_train=0, n_val=2, size=(48, 96), values=(1, 2), seed=1)
    for f in (odd / "val").rglob("*.png"):
        shutil.copy(f, ds / "val" / f.parent.name / f"z{f.name}")
    flags = ["-d", ds, "--class-list", "1 2", *FLAGS, "--val-tile-size", "64", "-log", tmp_path / "logs"]
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    r = run("tests/ddp_evaluate.py", one, *flags, launcher=())
    assert r.returncode == 0, r.stdout + r.stderr
    r = run("tests/ddp_evaluate.py", two, *flags)
    assert r.returncode == 0, r.stdout + r.stderr
    a, b = np.load(one), np.load(two)
    assert a["confusion"].sum() == 5 * 64 * 64 + 2 * 48 * 96
    assert np.array_equal(a["confusion"], b["confusion"])
    np.testing.assert_allclose(a["per_image_iou"], b["per_image_iou"])
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)


def test_a_mistake_under_torchrun_is_one_error_line(tmp_path):
    r = run("train.py", "-d", tmp_path / "missing", *FLAGS, "-log", tmp_path / "logs")
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert [ln for ln in out.splitlines() if ln.startswith("error:")] == [
        f"error: -d {tmp_path / 'missing'}: dataset folder not found"]
    ours = [ln for ln in out.splitlines() if ln.strip().startswith(f'File "{ROOT}/') and "/.venv/" not in ln]
    assert not ours, out  # torchrun's own report of the failed processes aside


def test_a_mistake_only_one_process_found_is_said_by_that_process():
    """Process 0 is not there to say it (torchrun would end it): the process that found it does, naming itself."""
    code = "import errors; errors.run_cli(lambda: (_ for _ in ()).throw(errors.UserError('bad tile in a.tif')))"
    r = run(launcher=("-c", code), env={"RANK": "1", "WORLD_SIZE": "2"})
    assert r.returncode == 2
    assert r.stderr == "error: bad tile in a.tif (process 1)\n"


def test_predict_under_one_and_two_processes_agrees_with_validate(tmp_path):
    """The same masks from validate.py --binary, predict.py, and predict.py as two torchrun processes; validate.py
    itself refuses torchrun in one line rather than scoring the set twice."""
    from conftest import make_checkpoint

    from fileio import read_image

    ds = make_dataset(tmp_path / "ds", n_train=0, n_val=5, size=(48, 80))
    ckpt = make_checkpoint(tmp_path / "m.pth", dtype="uint8", top=255.0, tile=64)
    r = run("validate.py", "-m", ckpt, "-d", ds / "val", "--binary", "--cpu", "-o", tmp_path / "v", launcher=())
    assert r.returncode == 0, r.stdout + r.stderr
    for name, launcher in (("one", ()), ("two", ("-m", "torch.distributed.run", "--standalone",
                                                 "--nproc_per_node=2"))):
        r = run("predict.py", "-m", ckpt, "-i", ds / "val" / "images", "-o", tmp_path / name, "--cpu",
                launcher=launcher)
        assert r.returncode == 0, r.stdout + r.stderr
    for mask in sorted((tmp_path / "v" / "masks").iterdir()):
        ref = read_image(mask)
        for name in ("one", "two"):
            assert (read_image(tmp_path / name / mask.name) == ref).mean() > 0.999
    r = run("validate.py", "-m", ckpt, "-d", ds / "val", "--cpu", "-o", tmp_path / "v2")
    assert r.returncode != 0 and "validate.py runs as one process" in r.stdout + r.stderr
