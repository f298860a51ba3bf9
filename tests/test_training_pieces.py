"""train.py's helpers: schedules, optimizers, the automatic crop size, extra val lists, loss weights, the worst val
images' pictures."""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import FAST, ROOT, make_dataset, make_trainer

import loaders
from augmentations import auto_image_size
from errors import UserError
from labels import Labels
from losses import loss_weights
from optim import OPTIMIZERS, SCHEDULES, make_optimizer, make_scheduler
from train import read_add_val_list, warn_large_images
from trainer import WorstImages


def lrs(schedule: str, epochs=10, steps=10, warmup=1.0) -> list[float]:
    model = torch.nn.Linear(2, 2)
    opt = make_optimizer("adamw", model, 1.0, 0.0)
    sched = make_scheduler(schedule, opt, epochs, steps, warmup)
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
    opt = make_optimizer("sgd", model, 1.0, 0.0)
    assert isinstance(opt, torch.optim.SGD) and set(OPTIMIZERS) == {"adamw", "adam", "sgd", "lion"}
    assert type(make_optimizer("lion", model, 1e-4, 1e-3)).__name__ == "Lion"  # timm's, installed with SMP
    sched = make_scheduler("plateau", opt, 10, 5, 0)
    for _ in range(7):
        sched.step(0.5)
    assert opt.param_groups[0]["lr"] == 0.5


def test_auto_image_size():
    assert auto_image_size([(128, 128)] * 3) == 128
    assert auto_image_size([(520, 696), (256, 320), (1024, 1024)]) == 512
    assert auto_image_size([(100, 300)]) == 96
    with pytest.raises(UserError, match="too small"):
        auto_image_size([(20, 20)])


def test_images_far_larger_than_the_crop_are_pointed_to_tiling(capsys):
    warn_large_images([(520, 696), (256, 320), (1024, 1024)], 512)
    assert capsys.readouterr().err == ""
    warn_large_images([(10980, 10980), (10980, 10980), (512, 512)], 512)
    err = capsys.readouterr().err
    assert "10980x10980 px (median), 459 times a 512 px crop" in err and "split_big_image_to_tiles.py" in err


def test_add_val_list_names_and_relative_paths(tmp_path):
    (tmp_path / "lists").mkdir()
    listing = tmp_path / "lists" / "vals.txt"
    # As Notepad saves it: byte-order mark, CRLF; a quoted path
    listing.write_bytes('\ufeff# extra sets\r\n../city/val\r\n\r\n"/abs/winter"\r\n../other/val\r\n'.encode())
    sets = read_add_val_list(str(listing))
    assert [n for n, _ in sets] == ["city_val", "winter", "other_val"]
    assert sets[0][1] == tmp_path / "lists" / ".." / "city" / "val"
    with pytest.raises(UserError, match="file not found"):
        read_add_val_list(str(tmp_path / "none.txt"))


def test_loss_weights_auto_and_given():
    pixels = [900, 90, 10]
    labels = Labels.from_args("1 2", None, None)
    weights, pos = loss_weights("auto", None, labels, pixels)
    assert pos is None and weights[1] == pytest.approx(1.0) and weights[2] == pytest.approx(9.0)
    assert weights[0] == pytest.approx(0.1)
    assert loss_weights(None, "auto", Labels.from_args("1", None, None), [900, 100])[1] == pytest.approx(9.0)
    with pytest.raises(UserError, match="one per class"):
        loss_weights("1 2", None, labels, pixels)
    assert math.isclose(loss_weights(None, "2.5", labels, pixels)[1], 2.5)
    for bad in ("-1", "nan", "0"):
        with pytest.raises(UserError, match="--pos-weight"):
            loss_weights(None, bad, labels, pixels)


def test_worst_images_keeps_the_k_lowest_with_their_classes(monkeypatch):
    monkeypatch.setattr(WorstImages, "PRUNE_BYTES", 3000)  # prune every few batches
    g = torch.Generator().manual_seed(0)
    worst, seen, start = WorstImages(5), [], 0
    for n, side in [(4, 16), (3, 20), (6, 16), (1, 30), (5, 16), (4, 24), (2, 16)]:
        iou = torch.randint(0, 6, (n,), generator=g).double() / 5  # many ties
        classes = torch.randint(0, 3, (n, side, side), generator=g)
        index = torch.randperm(n, generator=g) + start
        worst.add(iou, index, classes)
        seen += [(float(v), int(i), c) for v, i, c in zip(iou, index, classes, strict=True)]
        start += n
    expected = sorted(seen, key=lambda t: t[:2])[:5]
    got = worst.lowest()
    assert [t[:2] for t in got] == [t[:2] for t in expected]
    assert all(torch.equal(a[2], b[2].to(torch.uint8)) for a, b in zip(got, expected, strict=True))
    assert WorstImages(0).lowest() == []


def test_trainer_pictures_its_worst_val_images_without_a_second_pass(tmp_path):
    """The worst images' predictions kept during evaluation are those a second forward pass gives; those another
    torchrun process scored (simulated: dropped from what this process kept) are predicted again, the same."""
    import train
    from loaders import epoch_stream
    from runtime import Processes

    ds = make_dataset(tmp_path / "ds", n_train=4, n_val=6)
    args = train.get_args_parser().parse_args(["-d", str(ds), "-log", str(tmp_path / "logs"), *FAST,
                                                "--log-worst", "3"])
    trainer, evals = make_trainer(args, tmp_path / "exp", Processes(cpu=True))
    result = trainer.evaluate(evals[0], next(epoch_stream(evals[0].loader)))
    assert len(result.worst) == 3
    picked = trainer.worst(result)
    assert len({pred.tobytes() for _, _, pred in picked}) == 3  # distinct pictures, so a mix-up would show
    ious = result.per_image_iou.tolist()
    assert [i for i, _, _ in picked] == sorted(range(6), key=lambda i: (ious[i], i))[:3]
    result.worst = result.worst[:1]
    again = trainer.worst(result)
    for (i, iou, pred), (j, iou2, pred2) in zip(picked, again, strict=True):
        assert (i, iou) == (j, iou2) and pred.dtype == np.uint8 and np.array_equal(pred, pred2)


def test_loader_workers_fit_the_free_shared_memory(monkeypatch, capsys):
    """Workers hand batches over in /dev/shm (64 MB in a Docker container by default): those that would not fit
    are not started, with a warning saying how to give more, instead of a crash in a worker."""
    batch = 16 * 512 * 512  # pixels of one batch, RGB uint8: 16 MB with its mask
    for free_mb, expected in ((8192, (15, 4)), (1024, (15, 2)), (256, (4, 2)), (32, (0, 2))):
        monkeypatch.setattr(loaders, "shared_memory_free", lambda mb=free_mb: mb * 2 ** 20)
        assert loaders.fit_shared_memory(15, batch, 3, "uint8") == expected
        err = capsys.readouterr().err
        assert (f"{free_mb} MB free" in err and "--shm-size" in err) == (expected != (15, 4)), err
    assert loaders.fit_shared_memory(4, batch // 4, 4, "uint16") == (0, 2)  # 4 float32 bands: 4.25x the bytes
    monkeypatch.setattr(loaders, "shared_memory_free", lambda: None)  # no /dev/shm: nothing to fit
    assert loaders.fit_shared_memory(15, batch, 3, "uint8") == (15, 4)
    sizes = [(512, 512)] * 5 + [(2000, 2000)]
    assert loaders.largest_eval_batch(sizes, 4, 1024) == 2000 * 2000  # alone, being over the tile
    assert loaders.largest_eval_batch(sizes[:5], 4, 1024) == 4 * 512 * 512


def test_a_worker_out_of_shared_memory_is_one_error_line():
    message = ("Caught RuntimeError in DataLoader worker process 0. ... RuntimeError: unable to allocate shared "
               "memory(shm) for file </torch_1_2_3>: No space left on device (28)")
    code = f"import errors; errors.run_cli(lambda: (_ for _ in ()).throw(RuntimeError({message!r})))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: the shared memory") and "-w 0" in r.stderr and "--shm-size" in r.stderr
    from errors import shm_full

    assert shm_full("DataLoader worker (pid 5) is killed by signal: Bus error. It is possible that dataloader's "
                    "workers are out of shared memory.")  # file_descriptor sharing
    assert shm_full("unable to write to file </torch_12_3>: No space left on device (28)")
    assert not shm_full("out of resource: shared memory, Required: 98304, Hardware limit: 65536")  # a GPU kernel's
