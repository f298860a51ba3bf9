"""train.py end to end through its command line, on tiny generated datasets."""
import contextlib
import csv
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import FAST, ROOT, assert_user_error, broken_package, can_mount_tmpfs, make_dataset, run_script

from fileio import read_image, write_image


def rows(exp):
    with open(exp / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def train(ds, log, *extra):
    return run_script("train.py", "-d", ds, "-log", log, *FAST, *extra)


def test_binary_run_writes_checkpoints_metrics_and_events(tmp_path, binary_ds):
    r = run_script("train.py", "-d", binary_ds, "-log", tmp_path / "logs", *FAST, "--exp-name", "bin", "-e", "2",
                   env={"PYTHONPROFILEIMPORTTIME": "1"})  # python -X importtime
    assert r.returncode == 0, r.stderr[-3000:]
    imported = set(re.findall(r"^import time:.*\|\s*(\S+)$", r.stderr, re.M))
    assert "segmentation_models_pytorch" in imported and "torch._dynamo" not in imported  # no --compile
    exp = tmp_path / "logs" / "bin"
    history = rows(exp)
    assert [h["epoch"] for h in history] == ["1", "2"]
    assert list(history[0])[:4] == ["epoch", "train_loss", "val_loss", "val_miou"]
    assert {"iou_0", "iou_255", "lr"} <= set(history[0])
    assert list(exp.glob("events.out.tfevents*"))
    assert "epoch 2/2" in r.stdout and "val_mIoU" in r.stdout
    ckpt = torch.load(exp / "last.pth", weights_only=True)
    meta = ckpt["meta"]
    assert ckpt["epoch"] == 2 and meta["format"] == "segkit-checkpoint"
    assert (meta["arch"], meta["encoder"], meta["in_channels"], meta["out_channels"]) == ("unet", "resnet18", 3, 1)
    assert meta["labels"]["values"] == [255] and len(meta["stats"]["mean"]) == 3 and meta["image_size"] == 32
    best = torch.load(exp / "best.pth", weights_only=True)
    assert best["epoch"] in (1, 2) and set(best["model"]) == set(ckpt["model"])
    assert not list(exp.glob("*.tmp")) and not list(exp.glob(".*.tmp"))


def test_multiclass_16bit_nir_odd_length_non_ascii(tmp_path):
    ds = make_dataset(tmp_path / "данные набор", n_train=7, n_val=3, dtype=np.uint16, bands=("nir",),
                      values=(1, 2, 5), ext=".tif")
    r = train(ds, tmp_path / "logs", "--exp-name", "multi", "--add-dirs", "nir", "--class-list", "1 2 5",
              "--loss", "dice+ce", "-a", "hard", "-w", "1")
    assert r.returncode == 0, r.stderr
    exp = tmp_path / "logs" / "multi"
    assert {"iou_0", "iou_1", "iou_2", "iou_5"} <= set(rows(exp)[0])
    meta = torch.load(exp / "last.pth", weights_only=True)["meta"]
    assert meta["in_channels"] == 4 and meta["out_channels"] == 4 and meta["add_dirs"] == ["nir"]
    assert meta["dtype"] == "uint16" and meta["stats"]["max"][0] > 255


def test_listing_background_0_as_a_class_is_explained(tmp_path, binary_ds):
    """0/255 masks with --class-list "0 255": legitimate (0 becomes a class), but most who write it mean binary."""
    r = train(binary_ds, tmp_path / "logs", "--class-list", "0 255")
    assert r.returncode == 0 and "classes bg, 0, 255 (softmax)" in r.stdout, r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("warning: --class-list")] == [
        "warning: --class-list 0 255 makes value 0 a class of its own (counted in mIoU), so no training pixel is "
        "background and the model has 3 outputs, one for a class that never occurs; if 0 is the background of your "
        "masks, leave it out: --class-list 255"]


def pipe_holders(pipe) -> set[int]:
    """Processes other than this one with either end of `pipe` open (Linux /proc)."""
    name, found = f"pipe:[{os.fstat(pipe.fileno()).st_ino}]", set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) == name for fd in fd_dir.iterdir()):
                found.add(int(fd_dir.parent.name))
    return found - {os.getpid()}


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc")
def test_output_pipes_close_when_train_exits(tmp_path, binary_ds):
    """With loader workers, nothing train.py starts (torch's shared-memory managers) keeps its stdout or stderr
    open after it exits: `train.py | tee log` and notebooks would wait for it."""
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-d", str(binary_ds), "-log", str(tmp_path), *FAST,
                          "-w", "2"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert p.wait(timeout=600) == 0
    assert pipe_holders(p.stdout) == set() and pipe_holders(p.stderr) == set()
    assert b"done:" in p.stdout.read()
    p.stdout.close()
    p.stderr.close()


def test_runs_with_stderr_closed(tmp_path, binary_ds):
    """Started with no stderr at all (`2>&-`, some schedulers): the progress bars and warnings go nowhere, the run
    does not end at its first progress bar."""
    cmd = " ".join(map(str, [sys.executable, ROOT / "train.py", "-d", binary_ds, "-log", tmp_path, "--exp-name", "e",
                             *FAST, "2>&-"]))
    r = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0 and "done:" in r.stdout, r.stdout
    assert (tmp_path / "e" / "best.pth").is_file()


def test_grey_images_max_mask_val_and_ignore_label(tmp_path):
    ds = make_dataset(tmp_path / "ds", channels=1, values=(1, 2, 9))
    r = train(ds, tmp_path / "logs", "--exp-name", "g", "--max-mask-val", "2", "--ignore-label", "9",
              "--loss", "ce", "--class-weights", "auto")
    assert r.returncode == 0, r.stderr
    meta = torch.load(tmp_path / "logs" / "g" / "last.pth", weights_only=True)["meta"]
    assert meta["in_channels"] == 1 and meta["labels"] == {"values": [1, 2], "ignore": 9, "strict": True,
                                                          "flag": "--max-mask-val 2"}


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs root and unshare to give one run a small /dev/shm")
def test_small_shared_memory_trains_with_fewer_workers(tmp_path, binary_ds):
    """As in a Docker container (64 MB of /dev/shm by default), here 64 KB: workers' batches would not fit."""
    cmd = [sys.executable, ROOT / "train.py", "-d", binary_ds, "-log", tmp_path / "logs", *FAST[:-1], "2"]
    script = "mount -t tmpfs -o size=64k tmpfs /dev/shm && exec " + " ".join(map(shlex.quote, map(str, cmd)))
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=600)
    assert r.returncode == 0, r.stderr
    assert "/dev/shm has 0 MB free" in r.stderr and "--shm-size" in r.stderr
    assert "0 loader worker(s)" in r.stdout and "done:" in r.stdout


def test_workers_started_by_spawn_train_and_validate(tmp_path):
    """macOS and Windows start loader workers with spawn (Linux from Python 3.14 with forkserver): all a worker gets
    must pickle and the scripts must import cleanly as __mp_main__. Bands and the RAM cache ride along."""
    ds = make_dataset(tmp_path / "ds", bands=("nir",))
    start = "import multiprocessing, runpy, sys; multiprocessing.set_start_method('spawn'); sys.argv = sys.argv[1:]; " \
            "runpy.run_path(sys.argv[0], run_name='__main__')"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = {}
    for script, *args in (("train.py", "-d", ds, "--add-dirs", "nir", "-log", tmp_path / "logs", "--exp-name", "s",
                           "--cache", "ram", *FAST[:-1], "2"),
                          ("validate.py", "-d", ds / "val", "-m", tmp_path / "logs" / "s", "-o", tmp_path / "check",
                           "--binary", "--cpu", "-w", "2")):
        r = subprocess.run([sys.executable, "-c", start, script, *map(str, args)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
        out[script] = r.stdout
    assert "2 loader worker(s)" in out["train.py"] and "done:" in out["train.py"]
    assert "mIoU:" in out["validate.py"]


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs root and unshare to give one run a small file system")
def test_a_full_disk_is_one_error_line_and_leaves_no_torn_checkpoint(tmp_path, binary_ds):
    log = tmp_path / "logs"
    log.mkdir()
    cmd = [sys.executable, ROOT / "train.py", "-d", binary_ds, "-log", log, "--exp-name", "full", *FAST]
    script = f"mount -t tmpfs -o size=20m tmpfs {log} && " + " ".join(map(shlex.quote, map(str, cmd))) + \
        f"; echo rc=$?; ls -a {log / 'full'}"
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=600)
    assert "Traceback" not in r.stderr and "rc=2" in r.stdout, r.stdout + r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("error:")] == [
        f"error: {log / 'full'}/best.pth: the disk is full: free space or write elsewhere"]
    assert not any(name.endswith((".pth", ".tmp")) for name in r.stdout.split()), r.stdout


def test_trains_on_when_tensorboard_does_not_import(tmp_path, binary_ds):
    """As where protobuf and tensorboard versions clash (seen on Colab): a warning, and every other output."""
    r = run_script("train.py", "-d", binary_ds, "-log", tmp_path / "logs", "--exp-name", "t", *FAST,
                   env=broken_package(tmp_path / "site", "tensorboard", "TypeError"))
    assert r.returncode == 0, r.stderr
    assert "warning: TensorBoard logging is off (TypeError: broken tensorboard" in r.stderr
    assert {"best.pth", "last.pth", "metrics.csv"} <= {p.name for p in (tmp_path / "logs" / "t").iterdir()}
    assert len(rows(tmp_path / "logs" / "t")) == 1


def test_train_sh_with_a_python_too_old_says_so_before_making_a_venv(tmp_path):
    old = tmp_path / "python3"  # answers like Python 3.9: version_info < (3, 10) holds
    old.write_text('#!/bin/sh\ncase "$2" in *version_info*) exit 1;; *) echo "Python 3.9.18";; esac\n')
    old.chmod(0o755)
    env = dict(os.environ, PYTHON=str(old), VENV=str(tmp_path / "venv"))
    r = subprocess.run(["bash", "train.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
    assert r.stderr.startswith("error: segkit needs Python 3.10 or newer") and "Python 3.9.18" in r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "venv").exists()


def test_shell_scripts_take_paths_from_the_folder_they_run_in(tmp_path, binary_ds):
    """bash ~/segkit/train.sh from a project folder: DATASET and logs/ are that folder's, as for train.py."""
    env = dict(os.environ, VENV="none", PYTHON=sys.executable, HF_HUB_OFFLINE="1", DATASET="ds", EXP_NAME="here")
    r = subprocess.run(["bash", ROOT / "train.sh", *FAST], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and (tmp_path / "logs" / "here" / "best.pth").is_file(), r.stdout + r.stderr
    env.update(DATASET="ds/val", OUTPUT="out")
    r = subprocess.run(["bash", ROOT / "validate.sh", "--cpu", "-w", "0"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and len(list((tmp_path / "out" / "masks").iterdir())) == 3, r.stdout + r.stderr


def test_resume_continues_and_finished_run_exits_zero(tmp_path, binary_ds):
    log = tmp_path / "logs"
    assert train(binary_ds, log, "--exp-name", "r").returncode == 0
    r = train(binary_ds, log, "--exp-name", "r", "-e", "2")
    assert r.returncode == 0, r.stderr
    assert "resuming after epoch 1/2" in r.stdout and "epoch 2/2" in r.stdout
    assert [h["epoch"] for h in rows(log / "r")] == ["1", "2"]
    before = (log / "r" / "metrics.csv").read_text()
    r = train(binary_ds, log, "--exp-name", "r", "-e", "2")
    assert r.returncode == 0 and "already finished" in r.stdout
    assert (log / "r" / "metrics.csv").read_text() == before
    r = train(binary_ds, log, "--exp-name", "r", "-e", "3", "--encoder", "resnet34")
    assert_user_error(r, "--encoder resnet18 and this command has --encoder resnet34", "--exp-name")
    r = train(binary_ds, log, "--exp-name", "r", "-e", "3", "--add-dirs", "nir")
    assert_user_error(r, "trained with no --add-dirs and this command has --add-dirs nir")
    r = train(binary_ds, log, "--exp-name", "r", "-e", "4")  # more epochs: the schedule spreads over all 4
    assert r.returncode == 0 and float(rows(log / "r")[2]["lr"]) > 1e-5, r.stdout  # epoch 3 of 4 is not at the end


def test_resuming_on_other_data_is_said(tmp_path, binary_ds):
    """A moved copy resumes quietly (Colab copies data anew each session); other images get a warning, images of
    another pixel type an error (the saved normalisation would not fit them)."""
    log, moved, other = tmp_path / "logs", tmp_path / "moved", tmp_path / "other"
    assert train(binary_ds, log, "--exp-name", "r").returncode == 0
    shutil.copytree(binary_ds, moved)
    r = train(moved, log, "--exp-name", "r", "-e", "2")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    shutil.copytree(binary_ds, other)
    for p in (other / "train" / "images").iterdir():
        write_image(p, 255 - read_image(p))
    r = train(other, log, "--exp-name", "r", "-e", "3")
    assert r.returncode == 0 and "epoch 3/3" in r.stdout, r.stderr
    assert f"warning: -d {other}: its training images are not those experiment r started on" in r.stderr
    for p in [*(other / "train" / "images").iterdir(), *(other / "val" / "images").iterdir()]:
        write_image(p, read_image(p).astype(np.uint16) * 257)
    assert_user_error(train(other, log, "--exp-name", "r", "-e", "4"), "now 3 channels of uint16",
                      "trained on 3 of uint8")


def test_killed_run_resumes_to_the_same_result(tmp_path):
    ds = make_dataset(tmp_path / "ds", n_train=16, n_val=4)
    log = tmp_path / "logs"
    args = [sys.executable, str(ROOT / "train.py"), "-d", str(ds), "-log", str(log), *FAST, "-e", "3", "-b", "4"]
    subprocess.run([*args, "--exp-name", "ref"], check=True, capture_output=True, cwd=ROOT)
    p = subprocess.Popen([*args, "--exp-name", "killed"], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    csv_path = log / "killed" / "metrics.csv"
    deadline = time.monotonic() + 300
    while not (csv_path.exists() and len(csv_path.read_text().splitlines()) >= 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # into epoch 2
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    r = subprocess.run([*args, "--exp-name", "killed"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    ref, resumed = rows(log / "ref"), rows(log / "killed")
    assert [h["epoch"] for h in resumed] == ["1", "2", "3"]
    for a, b in zip(ref, resumed, strict=True):
        assert (a["train_loss"], a["val_miou"]) == (b["train_loss"], b["val_miou"])


def test_ctrl_c_says_which_epoch_is_saved_and_the_same_command_resumes(tmp_path, binary_ds):
    log = tmp_path / "logs"
    args = [sys.executable, str(ROOT / "train.py"), "-d", str(binary_ds), "-log", str(log), *FAST, "-e", "50",
            "--exp-name", "c"]
    with open(tmp_path / "err", "w") as err_file:
        p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=err_file, text=True,
                             env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1"))
        for line in p.stdout:
            if line.startswith("epoch 2/50"):
                break
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=120)
    err = (tmp_path / "err").read_text()
    assert p.returncode == 130 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    saved = torch.load(log / "c" / "last.pth", weights_only=True)["epoch"]
    assert saved >= 1 and last == f"interrupted: {log / 'c' / 'last.pth'} holds epoch {saved}; the same command " \
        "resumes from there", err
    r = run_script("train.py", *args[2:-4], "-e", str(saved + 1), "--exp-name", "c")
    assert r.returncode == 0 and f"resuming after epoch {saved}/{saved + 1}" in r.stdout, r.stderr


SLOW_DISK = """
import runpy, sys, time
import checkpoint
save = checkpoint.save
def slow_save(path, ckpt):
    time.sleep(0.5)
    print("wrote", path.name, ckpt.epoch, flush=True)
    save(path, ckpt)
checkpoint.save = slow_save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_epochs_faster_than_the_disk_never_wait_and_lose_nothing(tmp_path, binary_ds):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = tmp_path / "logs"
    r = subprocess.run([sys.executable, "-c", SLOW_DISK, str(ROOT / "train.py"), "-d", str(binary_ds), "-log",
                        str(log), *FAST, "-e", "6", "--exp-name", "slow"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    writes = [line.split() for line in r.stdout.splitlines() if line.startswith("wrote last.pth")]
    assert 1 <= len(writes) < 6 and writes[-1][2] == "6"  # some epochs were coalesced, the last one written
    history = rows(log / "slow")
    assert [h["epoch"] for h in history] == [str(e) for e in range(1, 7)]
    scores = [float(h["score"]) for h in history]
    best = torch.load(log / "slow" / "best.pth", weights_only=True)
    assert best["epoch"] == scores.index(max(scores)) + 1
    events = EventAccumulator(str(log / "slow")).Reload()
    assert [e.step for e in events.Scalars("metrics/val_miou")] == list(range(1, 7))


def test_add_val_dirs_select_on_weighted_mean(tmp_path, binary_ds):
    extra = make_dataset(tmp_path / "extra", n_train=1, n_val=2, seed=3)
    listing = tmp_path / "vals.txt"
    listing.write_text(f"{extra / 'val'}\n# a comment\n{binary_ds / 'val'}\n")
    r = train(binary_ds, tmp_path / "logs", "--exp-name", "av", "-e", "2", "--add-val-dirs", listing,
              "--adv-freq", "2")
    assert r.returncode == 0, r.stderr
    history = rows(tmp_path / "logs" / "av")
    assert history[0]["score"] == "" and history[1]["score"] != ""  # chosen on epochs that see every set
    assert history[0]["extra_val_miou"] == "" and history[1]["extra_val_miou"] != ""
    assert history[1]["ds_val_miou"] != ""
    r = train(binary_ds, tmp_path / "logs", "--exp-name", "only", "--add-val-dirs", listing, "--use-only-add-val")
    assert r.returncode == 0, r.stderr
    assert "val_miou" not in rows(tmp_path / "logs" / "only")[0]


# ------------------------------------------------------------------------------------------------ bad input
def break_dataset(ds, how):
    tr = ds / "train"
    if how == "missing_gt_dir":
        shutil.rmtree(tr / "gt")
    elif how == "empty_images":
        shutil.rmtree(tr / "images")
        (tr / "images").mkdir()
    elif how == "image_without_mask":
        (tr / "gt" / "t003.png").unlink()
    elif how == "mask_without_image":
        (tr / "images" / "t003.png").unlink()
    elif how == "mask_size":
        write_image(tr / "gt" / "t003.png", np.zeros((40, 64), np.uint8))
    elif how == "band_size":
        write_image(tr / "nir" / "t003.png", np.zeros((40, 64), np.uint8))
    elif how == "missing_band":
        (tr / "nir" / "t003.png").unlink()
    elif how == "zero_byte":
        (tr / "images" / "t003.png").write_bytes(b"")
    elif how == "corrupt":
        data = (tr / "images" / "t003.png").read_bytes()
        (tr / "images" / "t003.png").write_bytes(data[:40] + bytes(range(256)) * 2)
    elif how == "mask_value":
        m = read_image(tr / "gt" / "t003.png")
        m[:3] = 128
        write_image(tr / "gt" / "t003.png", m)
    elif how == "rgb_mask":
        m = read_image(tr / "gt" / "t003.png")
        write_image(tr / "gt" / "t003.png", np.stack([m, m * 0, m * 0], axis=2))
    elif how == "mixed_channels":
        write_image(tr / "images" / "t003.png", np.zeros((48, 64), np.uint8))
    elif how == "alpha_channel":
        write_image(tr / "images" / "t003.png", np.zeros((48, 64, 4), np.uint8))
    elif how == "val_channels":
        write_image(ds / "val" / "images" / "v001.png", np.zeros((48, 64), np.uint8))
    elif how == "masks_suffixed":
        for p in (tr / "gt").iterdir():
            p.rename(p.with_name(f"{p.stem}_mask{p.suffix}"))
    elif how == "bands_prefixed":
        for p in (ds / "val" / "nir").iterdir():
            p.rename(p.with_name(f"nir_{p.name}"))
    elif how == "blank_masks":
        for p in (tr / "gt").iterdir():
            write_image(p, np.zeros((48, 64), np.uint8))
    elif how == "jpeg_masks":
        for p in list((tr / "gt").iterdir()):
            write_image(p.with_suffix(".jpg"), read_image(p))
            p.unlink()
    elif how == "images_elsewhere":
        (tr / "images").rename(tr / "img")
    elif how == "smoothed_masks":  # masks resized with linear interpolation: blurred edges
        for p in (tr / "gt").iterdir():
            write_image(p, cv2.resize(cv2.resize(read_image(p), (128, 96)), (64, 48), interpolation=cv2.INTER_AREA))
    elif how == "masks_folder":  # gt/ under another name
        (tr / "gt").rename(tr / "masks")
    elif how == "mixed_types":  # one 16-bit image among 8-bit ones, each with an 8-bit band
        write_image(tr / "images" / "t003.png", read_image(tr / "images" / "t003.png").astype(np.uint16) * 257)
    elif how == "dead_link":  # as in a git-annex dataset whose files were not fetched
        (tr / "nir" / "t003.png").unlink()
        (tr / "nir" / "t003.png").symlink_to("../../.git/annex/objects/Xk/t003.png")
    elif how == "lfs_pointers":  # as in a repository cloned without git lfs
        for p in (tr / "gt").iterdir():
            p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 2048\n")


@pytest.mark.parametrize("how,needles", [
    ("missing_gt_dir", ["train/gt", "'gt' folder"]),
    ("empty_images", ["train/images", "empty"]),
    ("image_without_mask", ["t003", "no partner in gt/"]),
    ("mask_without_image", ["t003", "no image"]),
    ("mask_size", ["t003", "64x40", "64x48"]),
    ("band_size", ["t003", "nir"]),
    ("missing_band", ["t003", "nir/"]),
    ("zero_byte", ["t003", "empty (0 bytes)"]),
    ("corrupt", ["t003", "corrupt"]),
    ("mask_value", ["t003", "128", '--class-list "128 255"', "--ignore-label"]),
    ("rgb_mask", ["t003", "colour"]),
    ("mixed_channels", ["t003", "2 channels", "while 5 have 4"]),
    ("alpha_channel", ["t003", "5 channels", "while 5 have 4", "(an alpha channel? save them without it)"]),
    ("val_channels", ["v001", "differ from the training images"]),
    ("masks_suffixed", ["train/gt", "'_mask' after it", "t000_mask.png -> t000.png"]),
    ("bands_prefixed", ["val/nir", "'nir_' before it", "nir_v000.png -> v000.png"]),
    ("blank_masks", ["every train mask is all background", "train/gt"]),
    ("images_elsewhere", ["train/images not found", "img/"]),
    ("jpeg_masks", ["train masks are JPEG files", ".jpg", "PNG or TIFF"]),
    ("smoothed_masks", ["train masks are not binary: besides 0 and 255", "in-between values",
                        'convert_classes_in_masks.py', '/train/gt --map "1-127:0 128-254:255"']),
    ("masks_folder", ["train/gt not found (train/ holds images/, masks/, nir/; if masks/ holds the masks, rename it "
                      "gt/)"]),
    ("mixed_types", ["t003", "pixel type uint16 image + uint8 nir while 5 have uint8"]),
    ("dead_link", ["nir/t003.png: is a link to ../../.git/annex/objects/Xk/t003.png, which does not exist",
                   "git annex get"]),
    ("lfs_pointers", ["6 problems", "gt/t000.png: is a Git LFS pointer", "git lfs pull"]),
])
def test_bad_data_gets_one_clear_error(tmp_path, how, needles):
    ds = make_dataset(tmp_path / "ds", n_train=6, bands=("nir",))
    break_dataset(ds, how)
    r = train(ds, tmp_path / "logs", "--add-dirs", "nir", "--exp-name", "bad")
    assert_user_error(r, *needles)
    assert not (tmp_path / "logs" / "bad").exists()  # nothing half-made


def measures_little(ds: Path, how: str) -> None:
    """Data that trains, but whose validation would measure little (or whose masks may not match the pictures)."""
    if how == "val copies train":
        for src in sorted((ds / "train" / "images").iterdir())[:2]:
            shutil.copy(src, ds / "val" / "images" / f"copy_{src.name}")
            shutil.copy(ds / "train" / "gt" / src.name, ds / "val" / "gt" / f"copy_{src.name}")
    elif how == "masks as images":
        for split in ("train", "val"):
            for p in (ds / split / "images").iterdir():
                shutil.copy(ds / split / "gt" / p.name, p)
    elif how == "val without foreground":
        for p in (ds / "val" / "gt").iterdir():
            write_image(p, np.zeros_like(read_image(p)))
    elif how == "exif orientation":
        from PIL import Image

        for p in list((ds / "train" / "images").iterdir())[:2]:
            exif = Image.Exif()
            exif[0x0112] = 3  # turned by 180 degrees: the size stays, the pixels do not
            Image.fromarray(read_image(p)).save(p.with_suffix(".jpg"), exif=exif, quality=95)
            p.unlink()


@pytest.mark.parametrize("how,needle", [
    ("val copies train", "2 of the 5 val images are copies of training images (e.g."),
    ("masks as images", "6 train images hold exactly their own masks (e.g."),
    ("val without foreground", "no val mask holds a class (the default --class-list 255): every val image is all "
                               "background"),
    ("exif orientation", "2 train JPEG(s) carry an EXIF orientation (phone pictures, e.g."),
])
def test_data_that_would_measure_little_is_a_warning_before_training(tmp_path, how, needle):
    ds = make_dataset(tmp_path / "ds")
    measures_little(ds, how)
    for run in ("first", "remembered check"):
        r = train(ds, tmp_path / "logs", "--exp-name", run)
        assert r.returncode == 0 and f"warning: {needle}" in r.stderr, (run, r.stderr)


def test_a_single_training_image_is_named_as_the_cause_of_batches_of_one(tmp_path):
    ds = make_dataset(tmp_path / "ds", n_train=1, n_val=1)  # -b 2, but one sample: a 1x1 bottleneck at 32 px
    assert_user_error(train(ds, tmp_path / "logs"), "the training set holds 1 sample(s), so its batches hold one",
                      "add training images")


def test_masks_0_1_name_the_class_list(tmp_path):
    ds = make_dataset(tmp_path / "ds", values=(1,))
    assert_user_error(train(ds, tmp_path / "logs"), '--class-list "1"')
    multi = make_dataset(tmp_path / "multi", values=(1, 2, 5))  # the same values in val: said once, for train
    out = assert_user_error(train(multi, tmp_path / "logs"), 'train masks hold label values 1, 2, 5',
                            '--class-list "1 2 5"')
    assert "val masks" not in out and out.split("error: ", 1)[1].count("\n") == 1, out  # one line


@pytest.mark.parametrize("args,needles", [
    (["--image-size", "100"], ["--image-size 96"]),
    (["-m", "unetx"], ["unetx", "unet++", "deeplabv3+"]),
    (["--encoder", "resnet999"], ["resnet999", "did you mean"]),
    (["-m", "pan", "--image-size", "64"], ["--image-size 128"]),
    (["--encoder-weights", "imagenet"], ["imagenet", "--encoder-weights none"]),
    (["-d", "no_such_dataset"], ["no_such_dataset", "not found"]),
    (["--class-list", "1 x"], ["--class-list"]),
    (["--class-weights", "1 2 3"], ["--class-weights", "0, 255"]),
    (["-m", "deeplabv3", "-b", "1"], ["-b 2"]),
    (["--add-dirs", "nir,kv"], ['--add-dirs "nir kv"']),
])
def test_bad_flags_get_one_clear_error(tmp_path, binary_ds, args, needles):
    assert_user_error(train(binary_ds, tmp_path / "logs", *args), *needles)


def test_dataset_folder_at_the_wrong_level_names_the_right_one(tmp_path, binary_ds):
    for inside in (binary_ds / "train", binary_ds / "val" / "images"):
        assert_user_error(train(inside, tmp_path / "logs"), f"-d {inside} is a folder inside the dataset",
                          f"-d {binary_ds}\n")
    flat = tmp_path / "flat"
    (binary_ds / "train").rename(flat)
    assert_user_error(train(flat, tmp_path / "logs"), "not split into train/ and val/", "split_dataset.py")
    assert_user_error(train(tmp_path, tmp_path / "logs"), "no train/ folder", "flat/")


def test_missing_val_split_points_to_the_fix(tmp_path, binary_ds):
    (binary_ds / "val").rename(binary_ds / "valid")
    assert_user_error(train(binary_ds, tmp_path / "logs"), f"but {binary_ds / 'valid'} holds images/: pass -val "
                      f"{binary_ds / 'valid'}, or rename it val/")
    shutil.rmtree(binary_ds / "valid")
    assert_user_error(train(binary_ds, tmp_path / "logs"), "val", "-val DIR", "split_dataset.py")
    archive = shutil.make_archive(str(tmp_path / "ds"), "zip", binary_ds)
    assert_user_error(train(archive, tmp_path / "logs"), "ds.zip is a file, not a dataset folder: unpack it")


def test_unknown_preset_or_loss_lists_choices(tmp_path, binary_ds):
    for flag, value in (("-a", "extreme"), ("--loss", "hinge")):
        r = train(binary_ds, tmp_path / "logs", flag, value)
        assert r.returncode == 2 and "invalid choice" in r.stderr and "Traceback" not in r.stderr


def test_class_names_are_carried_everywhere_a_class_is_shown(tmp_path):
    ds = make_dataset(tmp_path / "ds", values=(1, 2, 5))
    r = train(ds, tmp_path / "logs", "--exp-name", "n", "--class-list", "1 2 5", "--class-names",
              "building, road, bare land")
    assert r.returncode == 0, r.stderr
    assert "classes background, building, road, bare land" in r.stdout
    assert {"iou_building", "iou_bare land"} <= set(rows(tmp_path / "logs" / "n")[0])
    r = run_script("validate.py", "-cd", tmp_path / "logs" / "n", "-d", ds / "val", "-o", tmp_path / "v")
    assert r.returncode == 0 and "bare land" in r.stdout, r.stderr
    scores = json.loads((tmp_path / "v" / "metrics.json").read_text())
    assert list(scores["per_class_iou"]) == ["background", "building", "road", "bare land"]
    assert "iou_bare land" in (tmp_path / "v" / "per_image.csv").read_text().splitlines()[0]
    assert run_script("export.py", "-m", tmp_path / "logs" / "n", "-o", tmp_path / "b").returncode == 0
    bundle = json.loads((tmp_path / "b" / "segkit.json").read_text())
    assert [c["name"] for c in bundle["classes"]] == ["background", "building", "road", "bare land"]
    assert [c["value"] for c in bundle["classes"]] == [0, 1, 2, 5]


@pytest.mark.parametrize("names,needle", [("water, land", "--class-names gives 2 name(s) for the 3 class value(s)"),
                                          ("a, a, b", "must be distinct"), ("names.txt", "names.txt: file not found")])
def test_bad_class_names_are_one_line(tmp_path, names, needle):
    ds = make_dataset(tmp_path / "ds", values=(1, 2, 5))
    assert_user_error(train(ds, tmp_path / "logs", "--class-list", "1 2 5", "--class-names", names), needle)


@pytest.mark.parametrize("flags,needle", [
    (["--budget", "20"], "--budget: '20' is not a duration such as 90s, 20m, 1.5h or 1h30m; write 20m or 20s"),
    (["--budget", "-5m"], "--budget: '-5m' is negative"), (["--budget", "0s"], "more than 0"),
    (["--budget", "1e9h"], "duration"),
    (["--budget", "1m", "-e", "5"], "--budget and -e both set how long to train"),
    (["--plan"], "--plan shows the plan of a --budget run"),
    (["--budget", "3s"], "too short"),
])
def test_bad_budgets_are_one_line(tmp_path, binary_ds, flags, needle):
    r = run_script("train.py", "-d", binary_ds, "-log", tmp_path / "logs", "--cpu", "-w", "0", "--encoder",
                   "resnet18", "--encoder-weights", "none", *flags)
    assert_user_error(r, needle)
    if "too short" in needle:
        assert "give at least --budget" in r.stderr


def test_budget_run_ends_in_time_with_its_plan_and_resumes_into_a_larger_budget(tmp_path, binary_ds):
    """--budget: the whole run, start-up included, ends within the budget; the plan is printed and kept in
    plan.json; flags given win; the same command again says the budget is used; a larger one continues."""
    base = ["train.py", "-d", binary_ds, "-log", tmp_path / "logs", "--cpu", "-w", "0", "--encoder", "resnet18",
            "--encoder-weights", "none", "-b", "2", "--exp-name", "b"]
    r = run_script(*base, "--budget", "40s", "--plan")
    assert r.returncode == 0 and "plan for --budget 0:40" in r.stdout and "(yours)" in r.stdout, r.stderr
    assert not (tmp_path / "logs" / "b" / "last.pth").exists()  # --plan trains nothing
    t0 = time.monotonic()
    r = run_script(*base, "--budget", "40s")
    wall = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert wall <= 40 * 1.05 + 5, wall
    exp = tmp_path / "logs" / "b"
    plan = json.loads((exp / "plan.json").read_text())
    assert plan["choices"]["batch_size"] == {"value": 2, "reason": "your flag", "yours": True}
    assert {"image_size", "loss", "repeats", "epochs", "aug"} <= set(plan["choices"])
    assert "left" in r.stdout and (exp / "best.pth").is_file() and len(rows(exp)) >= 2
    r = run_script(*base, "--budget", "40s")
    assert r.returncode == 0 and "used its budget" in r.stdout, r.stdout + r.stderr
    epochs = len(rows(exp))
    r = run_script(*base, "--budget", "60s")
    assert r.returncode == 0 and "resuming after epoch" in r.stdout and len(rows(exp)) > epochs, r.stdout + r.stderr
