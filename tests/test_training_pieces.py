"""train.py's helpers: schedules, optimizers, the automatic crop size, extra val lists, loss weights."""
import argparse
import math

import pytest
import torch
from conftest import make_dataset  # noqa: F401  (puts the repo on sys.path)

from dataset import ChannelStats, Labels
from errors import UserError
from train import (
    OPTIMIZERS,
    SCHEDULES,
    auto_image_size,
    loss_weights,
    make_optimizer,
    make_scheduler,
    read_add_val_list,
)


def lrs(schedule: str, epochs=10, steps=10, warmup=1.0) -> list[float]:
    model = torch.nn.Linear(2, 2)
    args = argparse.Namespace(optimizer="adamw", learning_rate=1.0, weight_decay=0.0, scheduler=schedule,
                              epochs=epochs, warmup_epochs=warmup)
    opt = make_optimizer(args, model)
    sched = make_scheduler(args, opt, steps)
    out = []
    for _ in range(epochs * steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedules_warm_up_then_follow_their_shape():
    cos = lrs("cosine")
    assert cos[0] == pytest.approx(0.1) and cos[9] == pytest.approx(1.0)  # 10 warm-up steps (a tenth of the run)
    assert cos[10] == pytest.approx(1.0) and cos[-1] < 0.001 and cos == sorted(cos[:10]) + sorted(cos[10:])[::-1]
    poly = lrs("poly", warmup=0)
    assert poly[50] == pytest.approx((1 - 50 / 100) ** 0.9)
    assert set(lrs("none", warmup=0)) == {1.0}
    assert set(SCHEDULES) == {"cosine", "poly", "none", "plateau"}


def test_plateau_halves_on_stalled_score():
    model = torch.nn.Linear(2, 2)
    args = argparse.Namespace(optimizer="sgd", learning_rate=1.0, weight_decay=0.0, scheduler="plateau",
                              epochs=10, warmup_epochs=0)
    opt = make_optimizer(args, model)
    assert isinstance(opt, torch.optim.SGD) and set(OPTIMIZERS) == {"adamw", "adam", "sgd"}
    sched = make_scheduler(args, opt, 5)
    for _ in range(7):
        sched.step(0.5)
    assert opt.param_groups[0]["lr"] == 0.5


def test_auto_image_size():
    assert auto_image_size([(128, 128)] * 3) == 128
    assert auto_image_size([(520, 696), (256, 320), (1024, 1024)]) == 512
    assert auto_image_size([(100, 300)]) == 96
    with pytest.raises(UserError, match="too small"):
        auto_image_size([(20, 20)])


def test_add_val_list_names_and_relative_paths(tmp_path):
    (tmp_path / "lists").mkdir()
    listing = tmp_path / "lists" / "vals.txt"
    listing.write_text("# extra sets\n../city/val\n\n/abs/winter\n../other/val\n")
    sets = read_add_val_list(str(listing))
    assert [n for n, _ in sets] == ["city_val", "winter", "other_val"]
    assert sets[0][1] == tmp_path / "lists" / ".." / "city" / "val"
    with pytest.raises(UserError, match="file not found"):
        read_add_val_list(str(tmp_path / "none.txt"))


def test_loss_weights_auto_and_given():
    stats = ChannelStats([0.0], [1.0], [0.0], [1.0], class_pixels=[900, 90, 10])
    labels = Labels.from_args("1 2", None, None)
    args = argparse.Namespace(class_weights="auto", pos_weight=None)
    weights, pos = loss_weights(args, labels, stats)
    assert pos is None and weights[1] == pytest.approx(1.0) and weights[2] == pytest.approx(9.0)
    assert weights[0] == pytest.approx(0.1)
    args = argparse.Namespace(class_weights=None, pos_weight="auto")
    assert loss_weights(args, Labels.from_args("1", None, None), ChannelStats([0.0], [1.0], [0.0], [1.0],
                                                                               [900, 100]))[1] == pytest.approx(9.0)
    with pytest.raises(UserError, match="one per class"):
        loss_weights(argparse.Namespace(class_weights="1 2", pos_weight=None), labels, stats)
    assert math.isclose(loss_weights(argparse.Namespace(class_weights=None, pos_weight="2.5"), labels, stats)[1], 2.5)
