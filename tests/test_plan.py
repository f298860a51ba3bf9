"""The training plan as a pure function of made-up datasets and machines, and --budget's durations."""
import argparse
import time

import pytest
from conftest import ROOT  # noqa: F401  (puts the repo on sys.path)

import budget
from budget import Clock, duration
from plan import GPU_SHARE, VAL_SHARE, Fingerprint, Machine, batch_from_probe, choose, schedule, validation_epochs

CPU = Machine("cpu", "2 CPU cores", cores=2)
GPU8 = Machine("cuda", "a 8 GB GPU", 8 * 2 ** 30, 8)
GPU80 = Machine("cuda", "an 80 GB GPU", 80 * 2 ** 30, 32)


def data(images=200, side=512, shares=(0.7, 0.3), obj=None, val_pixels=50 * 512 * 512):
    return Fingerprint(images=images, median_side=side, val_pixels=val_pixels, channels=4, dtype="uint16",
                       class_shares=list(shares), binary=len(shares) == 2, object_size=obj)


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("20m", 1200), ("1.5h", 5400), ("1h30m", 5400), (" 2H ", 7200)])
def test_durations(text, seconds):
    assert duration(text) == seconds


@pytest.mark.parametrize("text,needle", [("20", "write 20m or 20s"), ("-5m", "not a duration"), ("0s", "more than 0"),
                                         ("1e9h", "not a duration"), ("45d", "at most 30 days"), ("soon", "90s")])
def test_bad_durations_say_how_to_write_one(text, needle):
    with pytest.raises(argparse.ArgumentTypeError, match=needle):
        duration(text)


def test_crop_follows_the_objects_and_the_machine():
    assert choose(data(side=512), CPU, {}).value("image_size") == 256  # the CPU's cap
    assert choose(data(side=512), GPU80, {}).value("image_size") == 512
    small = choose(data(side=512, obj=20), CPU, {})  # 4 x 20 px objects: 96 px crops make more steps
    assert small.value("image_size") == 96 and "20 px objects" in small.choices["image_size"].reason
    assert choose(data(side=128), GPU80, {}).value("image_size") == 128  # never above the images


def test_rare_classes_get_a_loss_that_counts_them():
    binary = choose(data(shares=(0.996, 0.004)), CPU, {})
    assert binary.value("loss") == "dice+bce" and "pos_weight" not in binary.choices  # weights: measured worse
    assert "0.4%" in binary.choices["loss"].reason
    multi = choose(data(shares=(0.6, 0.3, 0.097, 0.003)), CPU, {})
    assert multi.value("loss") == "dice+ce" and "class_weights" not in multi.choices
    assert "class 3 is 0.3%" in multi.choices["loss"].reason
    assert choose(data(shares=(0.6, 0.4)), CPU, {}).value("loss") == "dice"


def test_the_users_flags_win_and_are_shown_as_theirs():
    plan = choose(data(shares=(0.999, 0.001)), CPU, {"image_size": 64, "loss": "focal"})
    assert plan.value("image_size") == 64 and plan.choices["image_size"].yours
    assert plan.value("loss") == "focal" and "(yours)" in plan.table()


@pytest.mark.parametrize("gpu,expected", [(GPU8, 16), (GPU80, 64)])
def test_gpu_batch_is_the_largest_that_fits_a_share_of_its_memory(gpu, expected):
    plan = choose(data(), gpu, {})
    peaks = {b: b * 0.25 * 2 ** 30 for b in (8, 16, 32, 64)}  # 32 ran out of memory on the 8 GB card: absent
    if gpu is GPU8:
        peaks.pop(64), peaks.pop(32)
    batch_from_probe(plan, gpu, peaks, {})
    assert plan.value("batch_size") == expected
    assert peaks[expected] <= GPU_SHARE * gpu.memory


@pytest.mark.parametrize("images,seconds,step_s,val_s", [(4, 600, 0.3, 0.5), (20000, 3600, 0.05, 60.0),
                                                          (64, 150, 0.33, 0.8), (24, 150, 1.2, 2.0)])
def test_schedule_fills_the_time_and_validates_within_a_tenth(images, seconds, step_s, val_s):
    fp = data(images=images)
    plan = choose(fp, CPU, {})
    schedule(plan, fp, seconds, step_s, val_s, {})
    per_epoch = max(1, images // 8) * plan.value("repeats")
    steps, validations = per_epoch * plan.value("epochs"), plan.value("validations")
    assert steps * step_s + validations * val_s <= seconds * 1.15
    assert steps * step_s >= 0.75 * seconds  # the time goes into training
    assert validations * val_s <= max(VAL_SHARE * seconds, val_s) * 1.3
    assert per_epoch >= 8 and (plan.value("repeats") == 1 or images < 64)  # a few images: several passes an epoch


def test_validations_are_dense_early_and_include_the_last_epoch():
    epochs = validation_epochs(37, 14)
    assert {1, 2, 3, 4, 5, 37} <= epochs and len(epochs) <= 15
    assert len([e for e in epochs if e <= 10]) > len([e for e in epochs if e > 10])
    assert validation_epochs(5, 1) == {5}


def test_clock_keeps_back_the_last_validation_and_the_writes():
    clock = Clock(100.0, spent=40.0)
    assert clock.end == pytest.approx(budget.START + 60)  # the budget counts from the process's start
    clock.end, clock.val_s, clock.step_s = time.monotonic() + 60, 5.0, 0.5
    assert clock.train_left() == pytest.approx(60 - 5 - clock.finish_s, abs=0.1)
    assert clock.steps_left(2) == pytest.approx((60 - clock.finish_s - 10) / 0.5, abs=1)
    clock.timed(4.0, 10, None)
    clock.timed(2.0, 10, 3.0)
    assert clock.step_s == 0.3 and clock.val_s == 3.0  # the steady rate of every epoch so far
