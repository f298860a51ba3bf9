from dataclasses import replace

import numpy as np
import pytest
from conftest import make_dataset

from checks import (
    SampleInfo,
    channel_stats,
    check_splits,
    constant_channel_note,
    dataset_problems,
    scan_samples,
    smoothed,
    zero_listed_note,
)
from dataset import SegmentationDataset, check_band_names, find_samples, mask_to_2d, masks_elsewhere, read_sample
from errors import UserError
from fileio import read_image, write_image
from labels import IGNORE_INDEX, ChannelStats, Labels


def test_pairs_by_stem_across_extensions(tmp_path):
    make_dataset(tmp_path, n_train=3, ext=".tif", bands=("nir",))
    samples = find_samples(tmp_path / "train", ["nir"])
    assert [s.stem for s in samples] == ["t000", "t001", "t002"]
    assert samples[0].image.suffix == ".tif" and samples[0].mask.suffix == ".png"
    assert samples[0].bands[0].parent.name == "nir"


def test_missing_partners_are_all_named(tmp_path):
    make_dataset(tmp_path, n_train=4, bands=("nir",))
    (tmp_path / "train" / "gt" / "t001.png").unlink()
    (tmp_path / "train" / "nir" / "t002.png").unlink()
    (tmp_path / "train" / "images" / "t003.png").unlink()
    with pytest.raises(UserError) as e:
        find_samples(tmp_path / "train", ["nir"])
    msg = str(e.value)
    # t003's missing image orphans both its gt and nir files
    assert "t001" in msg and "t002" in msg and "t003" in msg and "4 unpaired" in msg


def test_ambiguous_stem_is_an_error(tmp_path):
    make_dataset(tmp_path, n_train=2)
    write_image(tmp_path / "train" / "gt" / "t000.tif", np.zeros((48, 64), np.uint8))
    with pytest.raises(UserError, match=r"t000\.png and t000\.tif"):
        find_samples(tmp_path / "train", [])


@pytest.mark.parametrize("missing,needle", [("gt", "'gt' folder"), ("images", "'images' folder")])
def test_missing_folders(tmp_path, missing, needle):
    make_dataset(tmp_path, n_train=2)
    import shutil

    shutil.rmtree(tmp_path / "train" / missing)
    with pytest.raises(UserError, match=needle):
        find_samples(tmp_path / "train", [])


def test_labels_binary_multiclass_and_ignore():
    b = Labels.from_args(None, None, None)
    assert b.binary and b.out_channels == 1 and b.strict and b.lut()[255] == 1 and b.lut()[7] == 0
    m = Labels.from_args("1 2 5", None, 9)
    assert m.num_classes == 4 and m.out_channels == 4 and not m.strict
    assert m.lut()[[0, 1, 2, 5, 9, 3]].tolist() == [0, 1, 2, 3, IGNORE_INDEX, 0]
    assert Labels.from_args(None, 3, None).values == [1, 2, 3]
    with pytest.raises(UserError, match=r"class-list"):
        Labels.from_args("a b", None, None)
    with pytest.raises(UserError, match=r"ignore-label"):
        Labels.from_args("1 2", None, 2)


def test_masks_saved_as_grey_rgb_are_accepted_colour_masks_are_not(tmp_path):
    grey = np.repeat(np.array([[0, 255]], np.uint8)[..., None], 3, axis=2)
    assert mask_to_2d(grey, tmp_path / "m.png").tolist() == [[0, 255]]
    colour = grey.copy()
    colour[0, 1] = (255, 0, 0)
    with pytest.raises(UserError, match=r"colour"):
        mask_to_2d(colour, tmp_path / "m.png")


def test_scan_reports_every_problem_with_file_names(tmp_path):
    make_dataset(tmp_path, n_train=6, bands=("nir",))
    tr = tmp_path / "train"
    write_image(tr / "gt" / "t000.png", np.zeros((40, 64), np.uint8))                    # size mismatch
    write_image(tr / "nir" / "t001.png", np.zeros((40, 64), np.uint8))                   # band size mismatch
    (tr / "images" / "t002.png").write_bytes(b"")                                         # empty file
    write_image(tr / "images" / "t003.png", np.zeros((48, 64), np.uint8))                # 1 channel among RGB
    m = read_image(tr / "gt" / "t004.png")
    m[0, 0] = 128
    write_image(tr / "gt" / "t004.png", m)                                                # unknown label value
    labels = Labels.from_args(None, None, None)
    infos = scan_samples(find_samples(tr, ["nir"]), with_stats=True, workers=0)
    problems = "\n".join(dataset_problems(infos, labels, "train"))
    for stem in ("t000", "t001", "t002", "t003", "t004"):
        assert stem in problems, problems
    assert "128" in problems and '--class-list "128 255"' in problems


def test_a_folder_of_bad_files_shows_the_pattern_not_every_file(tmp_path):
    """A repository cloned without git lfs: every mask is a pointer; 20 are named, then the count."""
    make_dataset(tmp_path, n_train=25, n_val=2, size=(16, 16))
    for p in (tmp_path / "train" / "gt").iterdir():
        p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 99\n")
    splits = {name: find_samples(tmp_path / name, []) for name in ("train", "val")}
    with pytest.raises(UserError) as e:
        check_splits(splits, Labels.from_args(None, None, None), workers=1)
    lines = str(e.value).splitlines()
    assert lines[0] == "25 problems in the dataset:" and len(lines) == 22, lines
    assert all("is a Git LFS pointer" in ln for ln in lines[1:21]) and lines[-1] == "  ... and 5 more"


def test_zero_in_the_class_list_is_explained_only_where_nothing_is_background():
    note = zero_listed_note(Labels.from_args("0 1 2", None, None), [0, 10, 5, 7])
    assert note and note.endswith("--class-list 1 2") and "4 outputs" in note
    assert zero_listed_note(Labels.from_args("0 1 2", None, None), [3, 10, 5, 7]) is None  # other values: background
    assert zero_listed_note(Labels.from_args("1 2", None, None), [0, 10, 5]) is None


def test_masks_under_another_folder_name_are_pointed_at(tmp_path):
    make_dataset(tmp_path, n_train=2, bands=("nir",))
    (tmp_path / "train" / "gt").rename(tmp_path / "train" / "labels")
    with pytest.raises(UserError, match=r"train/gt not found \(train/ holds images/, labels/, nir/; if labels/ holds "
                                        r"the masks, rename it gt/\)"):
        find_samples(tmp_path / "train", ["nir"])
    assert masks_elsewhere(tmp_path / "train", []) == " (train/ holds images/, labels/, nir/)"  # which one is it?
    (tmp_path / "train" / "labels").rename(tmp_path / "train" / ".labels")
    assert masks_elsewhere(tmp_path / "train", ["nir"]) == ""


def test_a_dataset_check_is_remembered_until_its_files_or_the_rules_change(tmp_path, monkeypatch, capsys):
    import checks

    make_dataset(tmp_path / "ds", n_train=2, n_val=1, size=(16, 16))
    splits = {name: find_samples(tmp_path / "ds" / name, []) for name in ("train", "val")}
    labels = Labels.from_args(None, None, None)
    for rules, checked in ((checks.CHECK_RULES, True), (checks.CHECK_RULES, False), (checks.CHECK_RULES + 1, True)):
        monkeypatch.setattr(checks, "CHECK_RULES", rules)
        summary = checks.checked_splits(splits, labels, [], tmp_path / "cache", workers=1)
        assert ("checking 3 samples" in capsys.readouterr().out) == checked and summary.sizes["train"] == [(16, 16)] * 2


def test_channels_without_information_are_named():
    stats = ChannelStats(mean=[0.3, 0.4, 0.5, 255, 0], std=[0.1, 0.1, 0.1, 0, 0], min=[0, 0, 0, 255, 0],
                         max=[1, 1, 1, 255, 0], class_pixels=[10, 5])
    note = constant_channel_note(stats, ["nir"])
    assert note.startswith("image channel 4 is 255, band nir is 0 in every training pixel (an opaque alpha channel?")
    assert constant_channel_note(replace(stats, min=[0] * 5, max=[1] * 5), ["nir"]) is None


def test_blurred_binary_masks_are_told_from_label_values_of_more_classes():
    def info(values: dict) -> SampleInfo:
        return SampleInfo("s", "s.png", "s.png", mask_values=values)

    labels = Labels.from_args(None, None, None)
    edges = dict.fromkeys(range(8, 250, 16), 3)  # 16 values along the edges, few pixels each
    assert smoothed(labels, [info({0: 3000, 255: 1000, **edges})])
    voc = dict.fromkeys(range(1, 21), 400)  # classes 1..20 with 255 as void: small values, many pixels
    assert not smoothed(labels, [info({0: 3000, 255: 300, **voc})])
    assert not smoothed(labels, [info({0: 3000, **edges})])  # no class value: not binary masks at all
    assert not smoothed(Labels.from_args("1 2", None, None), [info({0: 3000, 255: 1000, **edges})])
    (voc_problem,) = dataset_problems([info({0: 3000, 255: 300, **voc})], labels, "train")
    assert '--class-list "1 2 3' in voc_problem and "JPEG" not in voc_problem and "not binary" not in voc_problem


def test_masks_0_1_suggest_class_list(tmp_path):
    make_dataset(tmp_path, n_train=3, values=(1,))
    infos = scan_samples(find_samples(tmp_path / "train", []), with_stats=False, workers=0)
    problems = " ".join(dataset_problems(infos, Labels.from_args(None, None, None), "train"))
    assert '--class-list "1"' in problems


def test_explicit_class_list_picks_values_others_become_background(tmp_path):
    make_dataset(tmp_path, n_train=3, values=(1, 2, 5))
    labels = Labels.from_args("2", None, None)
    infos = scan_samples(find_samples(tmp_path / "train", []), with_stats=False, workers=0)
    assert dataset_problems(infos, labels, "train") == []
    _, mask = read_sample(find_samples(tmp_path / "train", [])[0], labels.lut())
    assert set(np.unique(mask)) <= {0, 1}


def test_channel_stats_are_exact(tmp_path):
    make_dataset(tmp_path, n_train=4, dtype=np.uint16, bands=("nir",), size=(40, 50))
    samples = find_samples(tmp_path / "train", ["nir"])
    infos = scan_samples(samples, with_stats=True, workers=0)
    stats = channel_stats(infos, Labels.from_args(None, None, None))
    pixels = np.concatenate([read_sample(s, None)[0].reshape(-1, 4).astype(np.float64) for s in samples])
    np.testing.assert_allclose(stats.mean, pixels.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.std, pixels.std(0), rtol=1e-9)
    assert stats.max == pixels.max(0).tolist() and sum(stats.class_pixels) == len(pixels)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_samples_are_normalised_and_reproducible(tmp_path, dtype):
    """Samples come as stored (uint8) or float32; the model's first layer normalises them on the device: to zero
    mean and unit std over the training set, the same whether they passed the augmentations or not."""
    import albumentations as A
    import torch

    from augmentations import train_transform
    from model import Normalize

    make_dataset(tmp_path, n_train=4, dtype=dtype, bands=("nir",), ext=".tif")
    samples = find_samples(tmp_path / "train", ["nir"])
    labels = Labels.from_args(None, None, None)
    stats = channel_stats(scan_samples(samples, with_stats=True, workers=0), labels)
    plain = SegmentationDataset(samples, labels, stats)
    assert plain[0]["image"].dtype == (np.uint8 if dtype == np.uint8 else np.float32)
    raw = torch.from_numpy(np.stack([plain[i]["image"] for i in range(4)])).permute(0, 3, 1, 2)
    x = Normalize(stats)(raw).numpy()
    np.testing.assert_allclose(x.mean((0, 2, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(x.std((0, 2, 3)), 1, atol=1e-3)
    aug = SegmentationDataset(samples, labels, stats, train_transform("hard", 32, False, False))
    a, b, c = aug[(1, 7)], aug[(1, 7)], aug[(1, 8)]
    assert a["image"].shape == (32, 32, 4) and a["mask"].shape == (32, 32) and a["index"] == 1
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])
    assert not np.array_equal(a["image"], c["image"])
    # with the identity transform the augmentation path normalises exactly like the plain one
    ident = SegmentationDataset(samples, labels, stats, A.Compose([]))
    unit = dtype != np.uint8
    via_aug = Normalize(stats, unit=unit)(torch.from_numpy(ident[(0, 1)]["image"][None]).permute(0, 3, 1, 2))
    np.testing.assert_allclose(via_aug.numpy(), Normalize(stats)(raw[:1]).numpy(), atol=1e-4)


def test_val_masks_with_other_label_values_than_an_explicit_class_list(tmp_path):
    """train 0/255 and val 0/1 under --class-list 255 would score 0 without a word."""
    make_dataset(tmp_path, n_train=3, n_val=2)
    for p in (tmp_path / "val" / "gt").iterdir():
        write_image(p, (read_image(p) > 0).astype(np.uint8))
    labels = Labels.from_args("255", None, None)
    infos = scan_samples(find_samples(tmp_path / "val", []), with_stats=False, workers=0)
    assert "no val mask holds any of the class values 255" in " ".join(dataset_problems(infos, labels, "val"))


def test_nan_pixels_are_named(tmp_path):
    make_dataset(tmp_path, n_train=3, dtype=np.float32, ext=".tif")
    image = read_image(tmp_path / "train" / "images" / "t001.tif")
    image[2, 3, 0] = np.nan
    write_image(tmp_path / "train" / "images" / "t001.tif", image)
    infos = scan_samples(find_samples(tmp_path / "train", []), with_stats=True, workers=2)
    problems = " ".join(dataset_problems(infos, Labels.from_args(None, None, None), "train"))
    assert "t001" in problems and "NaN" in problems


@pytest.mark.parametrize("name", ["gt", "images", "../nir", "nir/x"])
def test_band_names_that_are_not_band_folders(name):
    with pytest.raises(UserError, match="--add-dirs"):
        check_band_names([name])
