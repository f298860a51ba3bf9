import math

import numpy as np
import pytest
import torch
from conftest import make_dataset  # noqa: F401  (puts the repo on sys.path)

import metrics
from errors import UserError
from labels import IGNORE_INDEX
from losses import LOSS_NAMES, SegmentationLoss


def test_confusion_matrix_matches_numpy_and_skips_ignored():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, (3, 20, 30))
    target[0, :5] = IGNORE_INDEX
    pred = rng.integers(0, 4, (3, 20, 30))
    meter = metrics.ConfusionMatrix(4, torch.device("cpu"))
    per_image = meter.update(torch.from_numpy(pred), torch.from_numpy(target))
    cm = meter.mat.numpy()
    valid = target != IGNORE_INDEX
    expected = np.zeros((4, 4), int)
    np.add.at(expected, (target[valid], pred[valid]), 1)
    assert np.array_equal(cm, expected)
    assert torch.equal(per_image.sum(0), torch.from_numpy(expected)) and per_image.shape == (3, 4, 4)


def test_miou_is_over_foreground_classes_of_the_whole_set():
    # class 1: tp 2, fp 1, fn 1 -> 0.5; class 2: tp 1, fp 0, fn 1 -> 0.5; background 3/5
    truth = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2]])
    pred = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 2, 0]])
    s = metrics.summarize(metrics.per_image_confusion(pred, truth, 3).sum(0))
    assert s["miou"] == pytest.approx(0.5)
    assert s["per_class_iou"] == pytest.approx([3 / 6, 0.5, 0.5])
    assert s["accuracy"] == pytest.approx(6 / 9)
    assert s["f1"][1] == pytest.approx(2 / 3) and s["precision"][1] == pytest.approx(2 / 3)


def test_absent_class_is_left_out_and_empty_image_is_perfect():
    truth = torch.zeros((2, 4, 4), dtype=torch.long)
    truth[0, :2] = 1
    pred = truth.clone()
    per_image = metrics.mean_foreground_iou(metrics.per_image_confusion(pred, truth, 3))
    assert per_image.tolist() == [1.0, 1.0]  # image 2 has no foreground anywhere: correct
    s = metrics.summarize(metrics.per_image_confusion(pred, truth, 3).sum(0))
    assert s["miou"] == 1.0 and math.isnan(s["per_class_iou"][2])


def test_binary_threshold():
    logits = torch.tensor([[[[-2.0, 0.1, 3.0]]]])
    assert metrics.predict_classes(logits).tolist() == [[[0, 1, 1]]]
    assert metrics.predict_classes(logits, threshold=0.9).tolist() == [[[0, 0, 1]]]


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("binary", [True, False])
def test_losses_ignore_pixels_and_prefer_the_truth(name, binary):
    if (binary and name in ("ce", "dice+ce")) or (not binary and name in ("bce", "dice+bce")):
        with pytest.raises(UserError):
            SegmentationLoss(name, binary)
        return
    k = 1 if binary else 3
    torch.manual_seed(0)
    target = torch.randint(0, 2 if binary else 3, (2, 16, 16))
    target[:, :4] = IGNORE_INDEX
    good = torch.where(torch.nn.functional.one_hot(target.clamp_max(k - 1 if k > 1 else 1), max(k, 2)).permute(
        0, 3, 1, 2).bool(), 6.0, -6.0)[:, (1,) if binary else slice(None)]
    loss = SegmentationLoss(name, binary)
    bad = -good
    good_loss, bad_loss = loss(good, target), loss(bad, target)
    assert torch.isfinite(good_loss) and good_loss < bad_loss
    # what the model says on ignored pixels does not matter
    noisy = good.clone()
    noisy[:, :, :4] = torch.randn_like(noisy[:, :, :4]) * 10
    assert loss(noisy, target).item() == pytest.approx(good_loss.item(), rel=1e-4, abs=1e-5)


def test_losses_run_in_float32_under_bf16():
    loss = SegmentationLoss("dice+bce", True)
    logits = torch.randn(2, 1, 8, 8, dtype=torch.bfloat16)
    assert loss(logits, torch.randint(0, 2, (2, 8, 8))).dtype == torch.float32


def test_class_scores_of_per_image_matrices_match_the_summary():
    truth = torch.tensor([[[0, 1, 1, 2]], [[0, 0, 2, 2]]])
    pred = torch.tensor([[[0, 1, 0, 2]], [[1, 0, 2, 2]]])
    per_image = metrics.per_image_confusion(pred, truth, 3)
    scores = metrics.class_scores(per_image)
    assert scores["iou"].shape == (2, 3) and scores["iou"][0, 1] == pytest.approx(0.5)
    assert scores["f1"][1, 2] == pytest.approx(1.0) and math.isnan(scores["recall"][1, 1])
    whole = metrics.summarize(per_image.sum(0))
    assert whole["f1"] == pytest.approx(metrics.class_scores(per_image.sum(0))["f1"].tolist())
