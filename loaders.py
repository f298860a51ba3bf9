"""From samples to batches: the training stream of batches drawn from (seed, epoch), size-grouped evaluation
batches, the RAM cache, and the DataLoader settings every loader shares.

Loaders are made once and run for the whole training: worker processes persist, and every stream is endless (the
trainer takes one epoch's worth of batches at a time), so the workers prepare the next epoch's first batches, train
and val alike, while the current epoch finishes. Batches stay in the pixels' own type (uint8 moves a quarter of the
bytes of float32); the model normalises on the device.
"""
import functools
import itertools
import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from dataset import Sample, SegmentationDataset, read_sample
from errors import UserError, warn
from runtime import worker_init


class EpochBatchSampler(Sampler):
    """Shuffled batches of (index, augmentation seed), epoch after epoch from first_epoch on, endlessly.

    Everything is drawn from (seed, epoch) alone, so any epoch can be reproduced on its own. Under torchrun each of
    the `world` processes takes its own share (rank, rank + world, ...) of every global batch of batch_size x world
    samples. A leftover batch of one sample per process is dropped (a different sample each epoch): batch norm
    cannot train on it. repeats: an epoch takes every sample that many times (each time another crop and
    augmentation), so small datasets make epochs long enough to be worth a validation.
    """

    def __init__(self, size: int, batch_size: int, seed: int, first_epoch: int = 1, rank: int = 0, world: int = 1,
                 repeats: int = 1):
        self.size, self.batch_size, self.seed, self.first_epoch = size, batch_size, seed, first_epoch
        self.rank, self.world, self.draws = rank, world, size * repeats

    def __len__(self) -> int:
        """Steps per epoch (the same in every process)."""
        step = self.batch_size * self.world
        full, rest = divmod(self.draws, step)
        return full + (rest >= 2 * self.world or (rest >= self.world and full == 0))

    def epoch_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        rng = np.random.default_rng([self.seed, epoch])
        order = (rng.permutation(self.draws) % self.size).tolist()
        seeds = rng.integers(0, 2 ** 31, self.draws).tolist()
        keys = list(zip(order, seeds, strict=True))
        step = self.batch_size * self.world
        return [keys[i * step:(i + 1) * step][self.rank::self.world] for i in range(len(self))]

    def __iter__(self):
        for epoch in itertools.count(self.first_epoch):
            yield from self.epoch_batches(epoch)


class SizeGroupedBatchSampler(Sampler):
    """Batches of images that share a size, so whole images stack without resizing; images with a side over
    `alone_above` (those the sliding window takes) go one at a time. Under torchrun every process takes every
    world-th batch. repeat: the batches over and over, for a loader that serves every epoch."""

    def __init__(self, sizes: list[tuple[int, int]], batch_size: int, rank: int = 0, world: int = 1,
                 repeat: bool = False, alone_above: int | None = None):
        groups: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(sizes):
            groups.setdefault(tuple(s), []).append(i)
        batches = [g[i:i + n] for size, g in groups.items()
                   for n in [1 if alone_above and max(size) > alone_above else batch_size]
                   for i in range(0, len(g), n)]
        self.batches, self.repeat = batches[rank::world], repeat

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return itertools.chain.from_iterable(itertools.repeat(self.batches)) if self.repeat else iter(self.batches)


# How workers hand batches over. file_descriptor (PyTorch's default on Linux) makes the main process fetch every
# tensor's descriptor from the worker's own sharing thread, one round trip each, which waits on the busy worker;
# file_system names the shared memory instead (measured in bench/RESULTS.md).
SHARING = "file_system"


PREFETCH = 4  # batches each worker prepares ahead
SHM = "/dev/shm"  # where workers' batches wait for the main process (both sharing strategies)


def loader_options(workers: int, device: torch.device, niceness: int = 0, prefetch: int = PREFETCH) -> dict:
    """Settings of every loader: worker processes that live as long as the loader and read ahead, one thread each,
    pinned memory for asynchronous copies to a GPU. With a GPU, workers run at lower priority (niceness): on a
    busy CPU the training process, which launches the GPU's work, and the pinning thread come first (measured in
    bench/RESULTS.md); validation's workers (5) before training's (10), which read ahead meanwhile."""
    cuda = device.type == "cuda"
    if workers > 0:
        torch.multiprocessing.set_sharing_strategy(SHARING)
    return {"num_workers": workers, "pin_memory": cuda, "persistent_workers": workers > 0,
            "worker_init_fn": functools.partial(worker_init, niceness=niceness if cuda else 0),
            "prefetch_factor": prefetch if workers > 0 else None}


def shared_memory_free() -> int | None:
    """Bytes free in /dev/shm, or None where there is none (not Linux)."""
    try:
        stat = os.statvfs(SHM)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def largest_eval_batch(sizes: list[tuple[int, int]], batch_size: int, tile_size: int | None) -> int:
    """Pixels of the largest batch an evaluation loader forms from images of these sizes."""
    batches = SizeGroupedBatchSampler(sizes, batch_size, alone_above=tile_size).batches
    return max((sum(sizes[i][0] * sizes[i][1] for i in batch) for batch in batches), default=0)


def fit_shared_memory(workers: int, pixels: int, channels: int, dtype: str) -> tuple[int, int]:
    """(workers, batches ahead per worker) whose batches in flight fit in half of the free /dev/shm, where workers
    hand them over; pixels: those of one batch of every loader alive at once, of images with these channels and
    type (handed over as uint8, or float32, with a uint8 mask). Containers often get 64 MB there (Docker's
    default), which a GPU machine's workers overflow: the run would die in a worker, so it slows down and says how
    to give it more."""
    free = shared_memory_free()
    batch_bytes = pixels * (channels * (1 if dtype == "uint8" else 4) + 1)
    if workers == 0 or free is None or batch_bytes <= 0 or free // 2 >= workers * PREFETCH * batch_bytes:
        return workers, PREFETCH
    fit = min(workers, free // 2 // (2 * batch_bytes))
    how = f"using {fit} worker(s), 2 batches ahead each" if fit else "loading in the main process (slower)"
    warn(f"{SHM} has {free / 2 ** 20:.0f} MB free, too little for {workers} loader workers with batches of "
         f"{batch_bytes / 2 ** 20:.1f} MB: {how}; for full speed give the machine more shared memory (Docker: "
         "--shm-size=8g) or pass a smaller -w")
    return fit, 2


def epoch_stream(loader: DataLoader) -> Iterator[Iterator]:
    """Per epoch, an iterator over that epoch's batches of an endless loader (len(loader) of them)."""
    batches = iter(loader)
    while True:
        yield itertools.islice(batches, len(loader))


def eval_loader(dataset: SegmentationDataset, sizes: list[tuple[int, int]], batch_size: int, tile_size: int | None,
                workers: int, device: torch.device, rank: int = 0, world: int = 1, repeat: bool = False,
                prefetch: int = PREFETCH) -> DataLoader:
    """Batches of equal-size whole images, formed and stacked in the workers; images larger than the tile (None:
    no tiling, --resize models) alone."""
    sampler = SizeGroupedBatchSampler(sizes, batch_size, rank, world, repeat, alone_above=tile_size)
    return DataLoader(dataset, batch_sampler=sampler, **loader_options(workers, device, 5, prefetch))


# --------------------------------------------------------------------------------------------------- RAM cache
def available_memory() -> int | None:
    """Bytes of memory available for new data (Linux), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


class _Fill:
    """Decodes sample i straight into its slice of the shared buffer (in a loader worker)."""

    def __init__(self, cache: "RamCache", samples: list[Sample], lut: np.ndarray):
        self.cache, self.samples, self.lut = cache, samples, lut

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> int:
        image, mask = read_sample(self.samples[i], self.lut)
        view_image, view_mask = self.cache.views(i, writable=True)
        view_image[...] = image.reshape(view_image.shape)
        view_mask[...] = mask
        return i


class RamCache:
    """Every sample decoded once into one shared-memory buffer (--cache ram): loader workers read views of it,
    whatever the start method, so the dataset sits in memory once, not once per worker."""

    def __init__(self, samples: list[Sample], lut: np.ndarray, sizes: list[tuple[int, int]], channels: int,
                 dtype: str, workers: int):
        itemsize = np.dtype(dtype).itemsize
        self.dtype, self.entries, offset = np.dtype(dtype), [], 0
        for h, w in sizes:  # (image offset, mask offset, h, w), each block 8-byte aligned
            image_bytes = -(-h * w * channels * itemsize // 8) * 8
            self.entries.append((offset, offset + image_bytes, h, w))
            offset += image_bytes + -(-h * w // 8) * 8
        self.channels = channels
        free = available_memory()
        if free is not None and offset > 0.8 * free:
            raise UserError(f"--cache ram needs {offset / 2 ** 30:.1f} GB but {free / 2 ** 30:.1f} GB of memory are "
                            "available; train without --cache")
        shm = shared_memory_free()
        if shm is not None and offset > 0.8 * shm:
            raise UserError(f"--cache ram needs {offset / 2 ** 30:.2f} GB of shared memory but {SHM} has "
                            f"{shm / 2 ** 30:.2f} GB free; train without --cache, or give the machine more shared "
                            "memory (Docker: --shm-size)")
        self.buffer = torch.empty(offset, dtype=torch.uint8).share_memory_()
        for _ in DataLoader(_Fill(self, samples, lut), batch_size=None, num_workers=workers):
            pass
        self.nbytes = offset

    def views(self, index: int, writable: bool = False) -> tuple[np.ndarray, np.ndarray]:
        start, mask_start, h, w = self.entries[index]
        raw = self.buffer.numpy()
        image = raw[start:start + h * w * self.channels * self.dtype.itemsize].view(self.dtype)
        image = image.reshape(h, w, self.channels)
        mask = raw[mask_start:mask_start + h * w].reshape(h, w)
        if not writable:
            image.flags.writeable = mask.flags.writeable = False
        return image, mask
