"""Training steps under a cgroup CPU quota (as `docker --cpus` or a Kubernetes CPU limit sets), by torch thread
count: threads beyond the quota are throttled, not run, which is why runtime.cap_threads sizes them to the quota.

  sudo python bench/cpu_quota.py --quota 1 --threads 1 2 8

Needs root (it makes a cgroup, v1 or v2, and removes it). Each row runs in a fresh process: Unet / ResNet-18,
batch 8, 128 px, forward + backward + AdamW, median of --steps steps after 2 warm-up steps.
"""
import argparse
import os
import subprocess
import sys
from pathlib import Path

STEP = """
import statistics, sys, time, torch, segmentation_models_pytorch as smp
torch.set_num_threads(int(sys.argv[1]))
model = smp.Unet("resnet18", encoder_weights=None, in_channels=3, classes=1)
opt, x, times = torch.optim.AdamW(model.parameters()), torch.randn(8, 3, 128, 128), []
for i in range(2 + int(sys.argv[2])):
    t = time.perf_counter()
    opt.zero_grad()
    model(x).mean().backward()
    opt.step()
    times.append(time.perf_counter() - t)
print(statistics.median(times[2:]) * 1000)
"""


def make_cgroup(quota: float | None) -> Path | None:
    """A cgroup limited to `quota` CPUs (None: no cgroup); returns the file a process joins it by."""
    if quota is None:
        return None
    v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    folder = Path("/sys/fs/cgroup" if v2 else "/sys/fs/cgroup/cpu") / "segkit-bench"
    folder.mkdir(exist_ok=True)
    if v2:
        (folder / "cpu.max").write_text(f"{int(quota * 100000)} 100000")
        return folder / "cgroup.procs"
    (folder / "cpu.cfs_period_us").write_text("100000")
    (folder / "cpu.cfs_quota_us").write_text(str(int(quota * 100000)))
    return folder / "tasks"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quota", type=float, default=1.0, help="CPUs the cgroup allows (1)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2, 8], help="torch thread counts to run")
    p.add_argument("--steps", type=int, default=6, help="timed steps per run (6)")
    args = p.parse_args()
    join = make_cgroup(args.quota)
    rows = []
    for quota in (None, args.quota):
        for threads in args.threads:
            def enter(path=join if quota else None):
                if path is not None:
                    path.write_text(str(os.getpid()))
            out = subprocess.run([sys.executable, "-c", STEP, str(threads), str(args.steps)], preexec_fn=enter,
                                 capture_output=True, text=True, check=True)
            rows.append((f"{quota:g} CPU" if quota else "none", threads, float(out.stdout)))
    if join is not None:
        join.parent.rmdir()
    print(f"| quota | torch threads | ms per step (visible cores: {len(os.sched_getaffinity(0))}) |\n|---|---|---|")
    for quota, threads, ms in rows:
        print(f"| {quota} | {threads} | {ms:.0f} |")


if __name__ == "__main__":
    main()
