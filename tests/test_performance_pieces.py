"""The performance levers: RAM cache, epoch stream, deterministic mode, AMP on CPU. Speed itself is measured by
bench/throughput.py, never here."""
import itertools

import numpy as np
import pytest
import torch
from conftest import FAST, make_dataset, run_script
from torch.utils.data import DataLoader

from augmentations import train_transform
from dataset import Labels, RamCache, SegmentationDataset, channel_stats, find_samples, scan_samples
from runtime import configure, worker_init
from trainer import EpochBatchSampler


@pytest.fixture
def sixteen_bit(tmp_path):
    ds = make_dataset(tmp_path / "ds", n_train=6, dtype=np.uint16, bands=("nir",), size=(40, 56))
    samples = find_samples(ds / "train", ["nir"])
    infos = scan_samples(samples, with_stats=True, workers=0)
    labels = Labels.from_args(None, None, None)
    return samples, infos, labels, channel_stats(infos, labels)


def test_ram_cache_returns_identical_samples(sixteen_bit):
    samples, infos, labels, stats = sixteen_bit
    cache = RamCache(samples, labels.lut(), [(i.height, i.width) for i in infos], infos[0].channels, infos[0].dtype,
                     workers=2)
    transform = train_transform("hard", 32, False, False)
    plain = SegmentationDataset(samples, labels, stats, transform)
    cached = SegmentationDataset(samples, labels, stats, train_transform("hard", 32, False, False), cache)
    for key in [(0, 11), (3, 5), (5, 99)]:
        a, b = plain[key], cached[key]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    image, mask = cache.views(2)
    assert not image.flags.writeable and image.dtype == np.uint16 and image.shape == (40, 56, 4)
    assert np.array_equal(mask, plain.load(2)[1])
    # through worker processes, which read the shared buffer
    sampler = EpochBatchSampler(len(samples), 2, seed=0)
    loaders = [DataLoader(d, batch_sampler=sampler, num_workers=2, worker_init_fn=worker_init) for d in (plain, cached)]
    for (xa, ya, ia), (xb, yb, ib) in itertools.islice(zip(*loaders, strict=True), 6):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)


def test_epoch_stream_is_the_epochs_in_order_and_drops_a_lone_sample():
    sampler = EpochBatchSampler(9, 2, seed=3, first_epoch=4)
    assert len(sampler) == 4  # the ninth sample of each epoch would be a batch of one
    stream = list(itertools.islice(iter(sampler), 8))
    assert stream == sampler.epoch_batches(4) + sampler.epoch_batches(5)
    assert stream[:4] != stream[4:]
    indices = [i for batch in stream[:4] for i, _ in batch]
    assert len(set(indices)) == 8 and all(len(b) == 2 for b in stream)
    assert EpochBatchSampler(9, 2, seed=3).epoch_batches(4) == sampler.epoch_batches(4)
    assert len(EpochBatchSampler(1, 4, 0)) == 1 and len(EpochBatchSampler(7, 4, 0)) == 2


def test_deterministic_flag_is_honoured():
    try:
        configure(torch.device("cpu"), deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_cli_runs_bf16_amp_cache_and_deterministic_on_cpu(tmp_path, binary_ds):
    r = run_script("train.py", "-d", binary_ds, "-log", tmp_path / "logs", "--exp-name", "a", *FAST, "--amp", "bf16",
                   "--cache", "ram", "--deterministic", "-w", "1")
    assert r.returncode == 0, r.stderr
    assert "amp bfloat16" in r.stdout and "cache:" in r.stdout
    # the cache changes nothing but speed: the same run without it gives the same numbers
    r2 = run_script("train.py", "-d", binary_ds, "-log", tmp_path / "logs", "--exp-name", "b", *FAST, "--amp",
                    "bf16", "--deterministic", "-w", "1")
    assert r2.returncode == 0, r2.stderr
    rows = [(tmp_path / "logs" / e / "metrics.csv").read_text().splitlines()[1].split(",")[:4] for e in "ab"]
    assert rows[0] == rows[1]
