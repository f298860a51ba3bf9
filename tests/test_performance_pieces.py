"""The performance levers: RAM cache, epoch stream, deterministic mode, AMP on CPU. Speed itself is measured by
bench/throughput.py, never here."""
import itertools

import numpy as np
import pytest
import torch
from conftest import FAST, make_dataset, run_script
from torch.utils.data import DataLoader

from augmentations import train_transform
from checks import channel_stats, scan_samples
from dataset import SegmentationDataset, find_samples
from labels import Labels
from loaders import EpochBatchSampler, RamCache, SizeGroupedBatchSampler
from runtime import configure, gc_paused, worker_init


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
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])
    image, mask = cache.views(2)
    assert not image.flags.writeable and image.dtype == np.uint16 and image.shape == (40, 56, 4)
    assert np.array_equal(mask, plain.load(2)[1])
    # through worker processes, which read the shared buffer
    sampler = EpochBatchSampler(len(samples), 2, seed=0)
    loaders = [DataLoader(d, batch_sampler=sampler, num_workers=2, worker_init_fn=worker_init) for d in (plain, cached)]
    for a, b in itertools.islice(zip(*loaders, strict=True), 6):
        assert all(torch.equal(a[k], b[k]) for k in ("image", "mask", "index"))


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


def test_epoch_stream_shards_each_global_batch_across_processes():
    """Under torchrun each process takes its share of every global batch: together they see what one would."""
    one = EpochBatchSampler(21, 6, seed=1).epoch_batches(3)
    ranks = [EpochBatchSampler(21, 3, seed=1, rank=r, world=2).epoch_batches(3) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # 3 global batches of 6; the 3 left would leave one process 1
    for step in range(3):
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(one[step])
        assert not set(ranks[0][step]) & set(ranks[1][step])


def test_size_grouped_batches_send_large_images_alone():
    sizes = [(64, 64), (64, 64), (64, 64), (2000, 64), (2000, 64), (32, 48)]
    batches = list(SizeGroupedBatchSampler(sizes, 2, alone_above=1024))
    assert sorted(map(sorted, batches)) == [[0, 1], [2], [3], [4], [5]]
    shards = [list(SizeGroupedBatchSampler(sizes, 2, rank=r, world=2, alone_above=1024)) for r in (0, 1)]
    assert sorted(i for s in shards for b in s for i in b) == list(range(6))
    endless = iter(SizeGroupedBatchSampler(sizes, 2, repeat=True))
    assert list(itertools.islice(endless, 8))[:4] == list(itertools.islice(endless, 4))


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


def test_gc_paused_freezes_what_the_imports_made_and_always_resumes():
    import gc

    before = gc.get_freeze_count()
    try:
        with gc_paused():
            assert not gc.isenabled()
            made = [[i] for i in range(1000)]  # objects the collector tracks, as an import makes
            raise KeyError("an import that fails")
    except KeyError:
        pass
    assert gc.isenabled() and gc.get_freeze_count() >= before + len(made)
    gc.unfreeze()


def _python(code: str, *args) -> str:
    """Run code in a fresh interpreter (this one may have loaded the compiler already); its stdout."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


PREDICT = """
import sys
import numpy as np
import torch
if sys.argv[3] == "compiler-first":
    import torch._dynamo
from inference import Predictor
p = Predictor.load(sys.argv[1], device="cpu")
image = np.random.default_rng(0).integers(0, 10000, (64, 80, 3), dtype=np.uint16)
np.save(sys.argv[2], p.predict(image).probs)
print("torch._dynamo" in sys.modules, torch.compiler.disable.__module__)
"""


def test_prediction_loads_no_compiler_and_predicts_the_same(tmp_path):
    from conftest import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "best.pth")
    assert _python(PREDICT, ckpt, tmp_path / "a.npy", "as-predict.py").split() == ["False", "torch.compiler"]
    assert _python(PREDICT, ckpt, tmp_path / "b.npy", "compiler-first").split() == ["True", "torch.compiler"]
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


def test_compiler_not_loaded_still_gives_the_compiler_to_whoever_imports_it():
    out = _python("""
import sys
import torch
from runtime import compiler_not_loaded
with compiler_not_loaded():
    import torchvision  # its roi_align module takes a compiler helper at import
    print("torch._dynamo" in sys.modules)
    import torch._dynamo  # something needs the compiler meanwhile
    from torch._dynamo.utils import counters
utils = sys.modules["torch._dynamo.utils"]
print(type(utils).__name__, utils.counters is counters, torch.compiler.disable.__module__)
helper = sys.modules["torchvision.ops.roi_align"].is_compile_supported
print(helper is not utils.is_compile_supported and helper("cpu") == utils.is_compile_supported("cpu"))
""")
    assert out.split() == ["False", "module", "True", "torch.compiler", "True"]


TRAIN_STEPS = """
import sys
import torch
from runtime import never_compiles
if sys.argv[1] == "never-compiles":
    never_compiles()
else:
    import torch._dynamo
import segmentation_models_pytorch as smp
from optim import make_optimizer
torch.manual_seed(0)
net = smp.Unet("resnet18", encoder_weights=None, in_channels=3, classes=2, decoder_channels=(16, 8, 8, 8, 8))
for name in ("adamw", "adam", "sgd", "lion"):  # timm's optimizers load the compiler (to configure it): lion last
    print(type(sys.modules["torch._dynamo"]).__name__)
    opt = make_optimizer(name, net, 1e-3, 1e-2)
    for _ in range(2):
        net(torch.ones(2, 3, 64, 64)).square().mean().backward()
        opt.step()
        opt.zero_grad()
print(sum(p.double().sum().item() for p in net.parameters()))
import torch._dynamo.config  # a submodule import gets the real compiler, each of its files run once
real = sys.modules["torch._dynamo"]
print(type(real).__name__, sys.modules["torch._dynamo.eval_frame"].config is torch._dynamo.config)
"""


def test_training_without_the_compiler_steps_the_same():
    """train.py without --compile stands torch._dynamo in for the process: the optimizers' no-op calls into it answer
    without loading it, the weights come out the same, and an import of it still gets the real one."""
    out, ref = _python(TRAIN_STEPS, "never-compiles").split(), _python(TRAIN_STEPS, "compiler-first").split()
    assert out[:4] == ["_CompilerLater"] * 4 and ref[:4] == ["module"] * 4
    assert out[4] == ref[4]  # the weights after 8 steps of 4 optimizers
    assert out[5:] == ref[5:] == ["module", "True"]


def test_cpu_quota_of_a_container_or_cgroup(tmp_path):
    """docker --cpus and Kubernetes limits set a cgroup quota that neither os.cpu_count nor torch reads."""
    from runtime import cgroup_cpu_quota

    def tree(membership: str, files: dict) -> float | None:
        root = tmp_path / f"t{len(list(tmp_path.iterdir()))}"
        root.mkdir()
        for rel, text in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
        (root / "cgroup").write_text(membership)
        return cgroup_cpu_quota(str(root / "fs"), str(root / "cgroup"))

    assert tree("0::/\n", {"fs/cpu.max": "150000 100000\n"}) == 1.5  # v2, inside the container
    assert tree("0::/kube/pod\n", {"fs/kube/pod/cpu.max": "max 100000\n", "fs/kube/cpu.max": "400000 100000\n"}) == 4
    assert tree("4:cpu,cpuacct:/docker/abc\n2:memory:/docker/abc\n",  # v1: the container's own files at the top
                {"fs/cpu,cpuacct/cpu.cfs_quota_us": "50000\n", "fs/cpu,cpuacct/cpu.cfs_period_us": "100000\n"}) == 0.5
    assert tree("4:cpu,cpuacct:/\n", {"fs/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
                                       "fs/cpu,cpuacct/cpu.cfs_period_us": "100000\n"}) is None
    assert tree("0::/\n", {}) is None  # no cgroup files at all: macOS-like
