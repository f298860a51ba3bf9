"""The README's commands, as written: every segkit command line it shows parses (scripts, flags and their values),
and the blocks a user runs after the quick start (predict, export, serve with curl, data preparation) run on the
bundled sample, or on two made-up scenes for the data preparation, in a folder laid out as the quick start leaves it."""
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tifffile
from conftest import ROOT, make_checkpoint

from fileio import read_image, write_image

SCRIPTS = {"train.py", "validate.py", "predict.py", "export.py", "serve.py"}


def bash_blocks() -> list[str]:
    """The README's ```bash blocks, continuation lines joined."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [b.replace("\\\n", " ") for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def block_with(needle: str) -> str:
    return next(b for b in bash_blocks() if needle in b)


def segkit_commands() -> list[list[str]]:
    """Every command line of the README that runs a segkit script or module: [script or -m module, *args]."""
    found = []
    for block in bash_blocks():
        for line in block.splitlines():
            words = shlex.split(line.split(" #")[0].replace("$scene", "scene_a").replace("${scene}", "scene_a"))
            while words and ("=" in words[0] or words[0] in ("do", "then")):
                words = words[1:]  # VAR=value prefixes
            for i, w in enumerate(words):
                if w.endswith(".py") and (Path(w).name in SCRIPTS or w.startswith("dataset_utils/")):
                    found.append(words[i:])
                    break
                if w == "-m" and i and (ROOT / f"{words[i + 1]}.py").is_file():  # python -m visualize ...
                    found.append(words[i:])
                    break
    return found


def test_every_segkit_command_in_the_readme_parses():
    """Scripts exist, flags exist and take the values shown: a renamed flag or script breaks this, not a user."""
    import importlib

    commands = segkit_commands()
    assert len(commands) > 20
    for words in commands:
        if words[0] == "-m":
            module, args = importlib.import_module(words[1]), words[2:]
        else:
            assert (ROOT / words[0]).is_file(), words[0]
            spec = importlib.util.spec_from_file_location(Path(words[0]).stem, ROOT / words[0])
            module, args = importlib.util.module_from_spec(spec), words[1:]
            spec.loader.exec_module(module)
        try:
            module.get_args_parser().parse_args(args)
        except SystemExit as e:
            raise AssertionError(f"README command does not parse: {' '.join(words)}") from e


def kit_folder(home: Path) -> Path:
    """A folder that looks like the kit's own (the README's commands run there): its scripts and the sample."""
    for item in [*ROOT.glob("*.py"), ROOT / "dataset_utils"]:
        (home / item.name).symlink_to(item)
    (home / "data").mkdir()
    (home / "data" / "sample").symlink_to(ROOT / "data" / "sample")
    return home


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory) -> Path:
    """The kit's folder as the quick start leaves it: logs/sample holding a model of the sample's layout."""
    home = kit_folder(tmp_path_factory.mktemp("home"))
    (home / "logs" / "sample").mkdir(parents=True)
    make_checkpoint(home / "logs" / "sample" / "best.pth", add_dirs=("nir",), tile=128,
                    train_args={"dataset_dir": "data/sample"})
    return home


def run_block(block: str, cwd: Path) -> subprocess.CompletedProcess:
    """A README block through bash, `python` being this interpreter."""
    bin_dir = cwd / "bin"
    bin_dir.mkdir(exist_ok=True)
    if not (bin_dir / "python").exists():
        (bin_dir / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
        (bin_dir / "python").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT))
    return subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def test_predict_and_export_block_runs_as_written(quick_start):
    r = run_block(block_with("python export.py"), quick_start)
    assert r.returncode == 0, r.stdout + r.stderr
    images = sorted((ROOT / "data" / "sample" / "val" / "images").iterdir())
    for folder in ("masks", "masks_onnx"):
        assert sorted(p.stem for p in (quick_start / folder).iterdir()) == sorted(p.stem for p in images)
    assert (quick_start / "out" / "5_prob.tif").is_file() and (quick_start / "out" / "5_overlay.jpg").is_file()


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl here")
def test_serve_and_its_curl_commands_run_as_written(quick_start, tmp_path):
    from test_serve import free_port

    port = str(free_port())
    serve = block_with("python serve.py").split(" #")[0].strip() + f" --port {port}"  # the README's, on a free port
    curl = block_with("curl -f").replace(":8000", f":{port}")
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen(["bash", "-c", serve.replace("python ", f"{sys.executable} ", 1)], cwd=quick_start,
                                stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                    time.sleep(0.3)
            r = run_block(curl, quick_start)
        finally:
            proc.terminate()
            proc.wait(20)
    assert r.returncode == 0, r.stdout + r.stderr
    mask = tifffile.imread(quick_start / "5_mask.tif")
    assert mask.shape == read_image(ROOT / "data" / "sample" / "val" / "images" / "5.tif").shape[:2]
    assert '"classes"' in r.stdout


def test_data_preparation_block_runs_as_written(tmp_path):
    kit_folder(tmp_path)
    rng = np.random.default_rng(0)
    for scene in ("scene_a", "scene_b"):
        mask = np.zeros((600, 700), np.uint8)
        mask[100:300, 150:500] = 255
        image = rng.integers(0, 4000, (600, 700, 3), dtype=np.uint16) + (mask[..., None] > 0) * 3000
        write_image(tmp_path / f"{scene}.tif", image.astype(np.uint16))
        write_image(tmp_path / f"{scene}_mask.tif", mask)
        write_image(tmp_path / f"{scene}_nir.tif", image[..., 0].astype(np.uint16))
    r = run_block(block_with("--by-prefix"), tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    for split in ("train", "val"):
        names = {p.name.split("_r")[0] for p in (tmp_path / "my_data" / split / "images").iterdir()}
        assert len(names) == 1  # one scene on each side
