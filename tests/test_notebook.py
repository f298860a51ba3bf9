"""The Colab notebook: committed without outputs, and run top to bottom on the CPU (SEGKIT_QUICK=1, as CI does) the
way a user without a public repository starts it: in an empty folder, with a zip of segkit (what `git archive`
makes), through every step: unpack, doctor, train, curves, validate, predict, export, zip."""
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import nbformat
from conftest import ROOT
from nbclient import NotebookClient

NOTEBOOK = ROOT / "segkit_colab.ipynb"


def repository_copy(dst):
    """The files git would commit (tracked, and new ones not ignored): what a clone of this work holds."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dst / name)
    return dst


def test_committed_without_outputs_and_one_parameters_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not any(c.outputs or c.execution_count for c in code)
    assert sum("DATASET =" in c.source for c in code) == 1
    assert nb.cells[0].cell_type == "markdown" and "colab" in nb.cells[0].source.lower()


def repository_zip(path: Path, files: Path) -> Path:
    """A zip of the repository's files, laid out as `git archive --format=zip -o segkit.zip HEAD` lays them out."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(files.rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(files))
    return path


def test_runs_top_to_bottom_on_the_cpu_from_a_zip_of_segkit(tmp_path, monkeypatch):
    archive = repository_zip(tmp_path / "segkit.zip", repository_copy(tmp_path / "files"))
    (tmp_path / "content").mkdir()  # Colab's empty working folder
    monkeypatch.setenv("SEGKIT_QUICK", "1")
    monkeypatch.setenv("SEGKIT_ZIP", str(archive))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path / "content")}}).execute()
    repo = tmp_path / "content" / "segkit"
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "epoch 2/2" in text and "val mIoU 0." in text
    assert "no GPU" in text and f"segkit ready in {repo}" in text  # unpacked from the zip
    scores = json.loads((repo / "results" / "val" / "metrics.json").read_text())
    assert scores["images"] == len(list((repo / "data" / "sample" / "val" / "images").iterdir()))
    assert (repo / "logs" / "colab" / "curves.png").is_file()
    assert len(list((repo / "results" / "predicted").glob("*.tif"))) == scores["images"]
    assert json.loads((repo / "results" / "bundle" / "segkit.json").read_text())["bands"] == ["image channels", "nir"]
    with zipfile.ZipFile(repo / "segkit_colab.zip") as z:
        assert "logs/colab/best.pth" in z.namelist() and "results/bundle/model.onnx" in z.namelist()
