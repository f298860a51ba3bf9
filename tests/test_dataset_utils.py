"""dataset_utils: each tool through its command line on known arrays."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from conftest import ROOT, assert_user_error, make_dataset, run_script

from fileio import read_image, write_image
from raster import RasterReader, tile_starts

TOOLS = "dataset_utils/"


def tool(name, *args):
    return run_script(f"{TOOLS}{name}.py", *args)


@pytest.fixture
def scene(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 10000, (300, 457, 4), dtype=np.uint16)
    mask = np.zeros((300, 457), np.uint8)
    mask[50:120, 60:300] = 255
    write_image(tmp_path / "scene.tif", image)
    write_image(tmp_path / "scene_mask.tif", mask)
    write_image(tmp_path / "scene_nir.tif", image[..., 0])
    return tmp_path, image, mask


@pytest.mark.parametrize("edge,overlap", [("shift", "64"), ("pad", "0.25"), ("shift", "0")])
def test_tiles_stitch_back_bit_exactly(scene, edge, overlap):
    folder, image, mask = scene
    r = tool("split_big_image_to_tiles", "--image", folder / "scene.tif", "--mask", folder / "scene_mask.tif",
             "--band", f"nir={folder / 'scene_nir.tif'}", "-o", folder / "tiles", "--tile-size", "128", "--overlap",
             overlap, "--edge", edge)
    assert r.returncode == 0, r.stderr
    tiles = sorted((folder / "tiles" / "images").iterdir())
    assert {p.name for p in tiles} == {p.name for p in (folder / "tiles" / "nir").iterdir()}
    # a 16-bit 4-band tile holds exactly its window of the image (the last row of tiles ends at the border)
    y, x = (192, 0) if edge == "pad" else (172, 0)
    tile = read_image(folder / "tiles" / "images" / f"scene_r{y:04d}_c{x:04d}.tif")
    assert tile.shape == (128, 128, 4) and tile.dtype == np.uint16
    h = min(128, 300 - y)
    assert np.array_equal(tile[:h], image[y:y + h, x:x + 128])
    assert (tile[h:] == 0).all()  # --edge pad: zeros past the border
    manifest = json.loads((folder / "tiles" / "manifest.json").read_text())["sources"]["scene"]
    assert (manifest["height"], manifest["width"], manifest["bands"]) == (300, 457, 4)
    for sub, original in (("images", image), ("gt", mask), ("nir", image[..., 0])):
        r = tool("stitch_tiles", folder / "tiles" / sub, "-o", folder / f"{sub}.tif")
        assert r.returncode == 0, r.stderr
        back = tifffile.imread(folder / f"{sub}.tif")
        assert back.dtype == original.dtype and np.array_equal(back, original)


def test_tile_starts_cover_every_pixel():
    for length, tile, stride, edge in ((457, 128, 64, "shift"), (457, 128, 96, "pad"), (128, 128, 64, "shift")):
        starts = tile_starts(length, tile, stride, edge)
        covered = np.zeros(length + tile, bool)
        for s in starts:
            covered[s:s + tile] = True
        assert covered[:length].all() and starts[0] == 0
        assert edge == "pad" or starts[-1] + tile == length


def test_skip_empty_and_nodata(scene):
    folder, image, _ = scene
    image[:150] = 0
    write_image(folder / "scene.tif", image)
    r = tool("split_big_image_to_tiles", "--image", folder / "scene.tif", "--mask", folder / "scene_mask.tif",
             "-o", folder / "t", "--tile-size", "100", "--skip-empty", "--nodata", "0")
    assert r.returncode == 0, r.stderr
    assert "skipped (empty)" in r.stdout and "skipped (nodata)" in r.stdout
    for p in (folder / "t" / "gt").iterdir():
        assert (read_image(p) > 0).any()


def test_geotiff_tags_follow_the_tiles(tmp_path):
    geo = [(33550, 12, 3, (10.0, 10.0, 0.0), True), (33922, 12, 6, (0, 0, 0, 500000.0, 4000000.0, 0), True),
           (34735, 3, 8, (1, 1, 0, 1, 3072, 0, 1, 32633), True)]
    data = np.arange(200 * 300, dtype=np.uint16).reshape(200, 300)
    tifffile.imwrite(tmp_path / "g.tif", data, tile=(64, 64), compression="zlib", extratags=geo)
    r = tool("split_big_image_to_tiles", "--image", tmp_path / "g.tif", "-o", tmp_path / "t", "--tile-size", "100")
    assert r.returncode == 0, r.stderr
    with tifffile.TiffFile(tmp_path / "t" / "images" / "g_r0100_c0200.tif") as t:
        assert t.pages[0].tags[33922].value[3:5] == (502000.0, 3999000.0)
        assert t.pages[0].tags[34735].value[-1] == 32633
    assert tool("stitch_tiles", tmp_path / "t" / "images", "-o", tmp_path / "back.tif").returncode == 0
    with tifffile.TiffFile(tmp_path / "back.tif") as t:
        assert t.pages[0].tags[33922].value[3:5] == (500000.0, 4000000.0)
        assert np.array_equal(t.asarray(), data)


@pytest.mark.parametrize("layout", ["tiled-planar", "striped", "raw"])
def test_window_reads_match_the_whole_image(tmp_path, layout):
    data = np.random.default_rng(1).integers(0, 60000, (3, 333, 250), dtype=np.uint16)
    kw = {"tiled-planar": {"tile": (64, 64), "planarconfig": "separate", "compression": "zlib"},
          "striped": {"rowsperstrip": 7, "compression": "lzw", "planarconfig": "separate"},
          "raw": {"planarconfig": "separate"}}[layout]
    tifffile.imwrite(tmp_path / "a.tif", data, photometric="minisblack", **kw)
    reader = RasterReader(tmp_path / "a.tif", cache_mb=0.01)
    whole = np.moveaxis(data, 0, -1)
    for y, x, h, w in ((0, 0, 10, 10), (50, 70, 100, 120), (300, 200, 33, 50)):
        assert np.array_equal(reader.read(y, x, h, w), whole[y:y + h, x:x + w])


def test_tiling_memory_stays_far_below_the_image(tmp_path):
    """A 3000x3000x4 uint16 tiled TIFF (72 MB): tiling it must not load it whole."""
    big = np.zeros((3000, 3000, 4), np.uint16)
    big[:] = np.arange(3000, dtype=np.uint16)[:, None, None]
    tifffile.imwrite(tmp_path / "big.tif", big, tile=(256, 256), compression="zlib", planarconfig="contig",
                     photometric="minisblack")
    del big
    probe = ("import resource, runpy, sys\nsys.argv = sys.argv[1:]\ntry:\n    {run}\nfinally:\n"
             "    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    tiler = str(ROOT / TOOLS / "split_big_image_to_tiles.py")
    base = subprocess.run([sys.executable, "-c", probe.format(run=f"sys.path[:0] = [{str(ROOT)!r}]\n    "
                                                                "import dataset_utils.split_big_image_to_tiles"),
                           "x"], capture_output=True, text=True, check=True)
    run = subprocess.run([sys.executable, "-c", probe.format(run="runpy.run_path(sys.argv[0], run_name='__main__')"),
                          tiler, "--image", str(tmp_path / "big.tif"), "-o", str(tmp_path / "t"), "--tile-size",
                          "512", "--overlap", "128"], capture_output=True, text=True, env=dict(os.environ))
    assert run.returncode == 0, run.stderr
    grown_mb = (int(run.stdout.split()[-1]) - int(base.stdout.split()[-1])) / 1024
    assert grown_mb < 72 / 2, f"tiling grew memory by {grown_mb:.0f} MB for a 72 MB image"


def test_tiler_bad_input(scene, tmp_path):
    folder, _, _ = scene
    args = ["--image", folder / "scene.tif", "-o", folder / "t"]
    assert_user_error(tool("split_big_image_to_tiles", "--image", folder / "none.tif", "-o", folder / "t"),
                      "none.tif", "not found")
    assert_user_error(tool("split_big_image_to_tiles", *args, "--tile-size", "512"), "--tile-size 512", "--edge pad")
    assert_user_error(tool("split_big_image_to_tiles", *args, "--overlap", "128", "--tile-size", "128"), "--overlap")
    write_image(folder / "small_mask.tif", np.zeros((100, 100), np.uint8))
    assert_user_error(tool("split_big_image_to_tiles", *args, "--mask", folder / "small_mask.tif"), "small_mask.tif",
                      "100x100", "457x300")
    (tmp_path / "file").write_text("x")
    assert_user_error(tool("split_big_image_to_tiles", "--image", folder / "scene.tif", "-o", tmp_path / "file" / "t"),
                      "cannot write")
    assert not (folder / "t").exists()
    assert tool("split_big_image_to_tiles", *args, "--tile-size", "128").returncode == 0
    assert_user_error(tool("split_big_image_to_tiles", *args, "--tile-size", "128"), "already holds", "--overwrite")
    assert tool("split_big_image_to_tiles", *args, "--tile-size", "100", "--overwrite").returncode == 0
    assert all("_r" in p.stem and read_image(p).shape[0] == 100 for p in (folder / "t" / "images").iterdir())


def test_stitch_bad_input(tmp_path):
    assert_user_error(tool("stitch_tiles", tmp_path / "none", "-o", tmp_path / "o.tif"), "none", "not found")
    (tmp_path / "plain").mkdir()
    write_image(tmp_path / "plain" / "a.png", np.zeros((4, 4), np.uint8))
    assert_user_error(tool("stitch_tiles", tmp_path / "plain", "-o", tmp_path / "o.tif"), "<scene>_r<row>_c<col>")


def test_stitch_takes_the_centre_tile_for_disagreeing_labels(tmp_path):
    (tmp_path / "t").mkdir()
    write_image(tmp_path / "t" / "s_r0000_c0000.png", np.full((10, 10), 1, np.uint8))
    write_image(tmp_path / "t" / "s_r0000_c0006.png", np.full((10, 10), 2, np.uint8))
    assert tool("stitch_tiles", tmp_path / "t", "-o", tmp_path / "o.png").returncode == 0
    out = read_image(tmp_path / "o.png")
    assert out.shape == (10, 16) and set(np.unique(out)) == {1, 2}
    assert (out[:, :8] == 1).all() and (out[:, 8:] == 2).all()  # each pixel from the tile whose centre is nearer


def test_split_keeps_pairs_is_seeded_and_keeps_scenes_together(tmp_path):
    src = tmp_path / "all"
    for scene in ("a", "b", "c", "d", "e"):
        for i in range(4):
            stem = f"{scene}_r{i * 100:04d}_c0000"
            for folder in ("images", "gt", "nir"):
                (src / folder).mkdir(parents=True, exist_ok=True)
                write_image(src / folder / f"{stem}.png", np.full((8, 8), ord(scene) + i, np.uint8))
    runs = []
    for out in ("s1", "s2"):
        r = tool("split_dataset", src, "-o", tmp_path / out, "--val", "0.4", "--seed", "3", "--by-prefix",
                 "--mode", "hardlink")
        assert r.returncode == 0, r.stderr
        runs.append(json.loads((tmp_path / out / "split.json").read_text()))
    assert runs[0] == {**runs[1], "source": runs[0]["source"]}
    scenes = {split: {s.split("_")[0] for s in runs[0][split]} for split in ("train", "val")}
    assert not scenes["train"] & scenes["val"] and len(runs[0]["val"]) == 8
    for split in ("train", "val"):
        stems = {p.stem for p in (tmp_path / "s1" / split / "images").iterdir()}
        assert stems == {p.stem for p in (tmp_path / "s1" / split / "gt").iterdir()}
        assert stems == {p.stem for p in (tmp_path / "s1" / split / "nir").iterdir()}
        assert stems == set(runs[0][split])
    other = tool("split_dataset", src, "-o", tmp_path / "s3", "--val", "0.4", "--seed", "4")
    assert other.returncode == 0
    assert_user_error(tool("split_dataset", src, "-o", tmp_path / "s1"), "not empty")
    assert_user_error(tool("split_dataset", src, "-o", tmp_path / "s4", "--val", "0.7", "--test", "0.4"), "--val")
    (src / "gt" / "e_r0300_c0000.png").unlink()
    (src / "gt" / "e_r0300_c0000.png").symlink_to("/media/usb/e.png")  # a git-annex file not fetched, say
    assert_user_error(tool("split_dataset", src, "-o", tmp_path / "s5"), "e_r0300_c0000.png: is a link to")
    assert not (tmp_path / "s5").exists()


def test_remap_values_in_place(tmp_path):
    masks = tmp_path / "gt"
    masks.mkdir()
    write_image(masks / "a.png", np.array([[0, 64, 128, 255]], np.uint8))
    (masks / "notes.txt").write_text("kept")
    r = tool("convert_classes_in_masks", masks, "--map", "64:1 128:2 255:0")
    assert r.returncode == 0, r.stderr
    assert read_image(masks / "a.png").tolist() == [[0, 1, 2, 0]]
    assert (masks / "notes.txt").read_text() == "kept" and sorted(p.name for p in tmp_path.iterdir()) == ["gt"]
    assert_user_error(tool("convert_classes_in_masks", masks, "--map", "1:5", "--unmapped", "error"), "a.png",
                      "values not listed: 0, 2")
    assert read_image(masks / "a.png").tolist() == [[0, 1, 2, 0]]  # nothing changed
    assert_user_error(tool("convert_classes_in_masks", masks, "--map", "1-5"), "--map")


def test_ranges_threshold_smoothed_masks(tmp_path):
    """What train.py proposes for masks with blurred edges: value ranges in --map."""
    masks = tmp_path / "gt"
    masks.mkdir()
    write_image(masks / "a.png", np.array([[0, 3, 127, 128, 200, 254, 255]], np.uint8))
    r = tool("convert_classes_in_masks", masks, "--map", "1-127:0 128-254:255")
    assert r.returncode == 0, r.stderr
    assert read_image(masks / "a.png").tolist() == [[0, 0, 0, 255, 255, 255, 255]]
    for bad in ("9-3:0", "1-70000:0", "a-b:1"):
        assert_user_error(tool("convert_classes_in_masks", masks, "--map", bad), f"--map '{bad}'", "1-127:0")


def test_palette_to_index_masks(tmp_path):
    painted = tmp_path / "painted"
    painted.mkdir()
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0] = (0, 0, 255)
    rgb[1, 2] = (255, 0, 0)
    write_image(painted / "m.png", rgb)
    r = tool("convert_classes_in_masks", painted, "-o", tmp_path / "gt", "--palette", "0,0,255:1 255,0,0:2 0,0,0:0")
    assert r.returncode == 0, r.stderr
    assert read_image(tmp_path / "gt" / "m.png").tolist() == [[1, 0, 0], [0, 0, 2]]
    assert_user_error(tool("convert_classes_in_masks", painted, "-o", tmp_path / "gt2", "--palette", "0,0,255:1"),
                      "m.png", "(255, 0, 0)", "--unmapped")
    assert not (tmp_path / "gt2").exists()


def test_filter_moves_empty_samples_with_all_their_files(tmp_path):
    ds = make_dataset(tmp_path / "ds", n_train=4, bands=("nir",))
    write_image(ds / "train" / "gt" / "t002.png", np.zeros((48, 64), np.uint8))
    r = tool("filter_dataset", ds, "--drop-empty", "--move-to", tmp_path / "dropped")
    assert r.returncode == 0, r.stderr
    assert not (ds / "train" / "images" / "t002.png").exists()
    for folder in ("images", "gt", "nir"):
        assert (tmp_path / "dropped" / "train" / folder / "t002.png").exists()
    r = tool("filter_dataset", ds, "--min-fg", "0.5", "--list", tmp_path / "kept.txt")
    assert r.returncode == 0 and (tmp_path / "kept.txt").read_text() == ""


def test_stats_are_exact(tmp_path):
    ds = make_dataset(tmp_path / "ds", n_train=3, n_val=1, dtype=np.uint16, bands=("nir",))
    r = tool("dataset_stats", ds, "-o", tmp_path / "s.json")
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "s.json").read_text())["train"]
    pixels = np.concatenate([np.concatenate([read_image(ds / "train" / "images" / f"t{i:03d}.png").reshape(-1, 3),
                                             read_image(ds / "train" / "nir" / f"t{i:03d}.png").reshape(-1, 1)], 1)
                             for i in range(3)]).astype(np.float64)
    np.testing.assert_allclose(s["mean"], pixels.mean(0))
    np.testing.assert_allclose(s["std"], pixels.std(0))
    assert s["channels"] == ["image", "image", "image", "nir"] and s["percentiles"]["50"][3] == pytest.approx(
        np.percentile(pixels[:, 3], 50), abs=1)
    assert sum(s["class_pixels"]) == len(pixels)


def test_doctor_passes_clean_and_names_every_planted_problem(tmp_path):
    ds = make_dataset(tmp_path / "ds", n_train=8, n_val=3, bands=("nir",))
    r = tool("check_dataset", ds)
    assert r.returncode == 0 and "ready to train" in r.stdout, r.stdout
    tr = ds / "train"
    (tr / "gt" / "t000.png").unlink()                                               # image without mask
    write_image(tr / "nir" / "t001.png", np.zeros((20, 20), np.uint8))              # band size
    (tr / "images" / "t002.png").write_bytes(b"")                                   # empty file
    m = read_image(tr / "gt" / "t003.png")
    m[0, :5] = 128
    write_image(tr / "gt" / "t003.png", m)                                          # value outside the list
    shutil.copy(tr / "images" / "t004.png", ds / "val" / "images" / "v000.png")    # leakage into val
    write_image(tr / "gt" / "t005.jpg", read_image(tr / "gt" / "t005.png"))        # ambiguous mask stem
    (tr / "gt" / "t005.png").unlink()
    (tr / "images" / "t006.png").unlink()
    (tr / "images" / "t006.png").symlink_to("/media/usb/t006.png")                 # a link to nothing
    r = tool("check_dataset", ds)
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "Traceback" not in out
    for needle in ("t000", "t001", "t002", "t003", "128", "t004", "v000", "leaks", "JPEG",
                   "t006.png: is a link to /media/usb/t006.png, which does not exist"):
        assert needle in out, needle


def test_doctor_reports_masks_0_1_with_the_class_list_fix(tmp_path):
    ds = make_dataset(tmp_path / "ds", values=(1,))
    r = tool("check_dataset", ds)
    assert r.returncode == 1 and '--class-list "1"' in r.stdout
    assert tool("check_dataset", ds, "--class-list", "1").returncode == 0


def test_tools_never_import_torch(tmp_path):
    """The data tools start in a fraction of the time torch takes to load: no tool may pull it in, at --help or at
    work."""
    ds = make_dataset(tmp_path / "ds", n_train=3, bands=("nir",))
    probe = ("import runpy, sys\nsys.path.insert(0, {root!r})\nsys.argv = sys.argv[1:]\ntry:\n"
             "    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('torch' in sys.modules)")
    runs = [[tool, "--help"] for tool in sorted((ROOT / TOOLS).glob("*.py")) if tool.name != "__init__.py"]
    runs += [[ROOT / TOOLS / "check_dataset.py", ds], [ROOT / TOOLS / "dataset_stats.py", ds],
             [ROOT / TOOLS / "split_dataset.py", ds / "train", "-o", tmp_path / "split"]]
    for run in runs:
        r = subprocess.run([sys.executable, "-c", probe.format(root=str(ROOT)), *map(str, run)], capture_output=True,
                           text=True, cwd=ROOT)
        assert r.stdout.strip().splitlines()[-1] == "False", (run, r.stdout[-300:], r.stderr[-300:])


def test_overwrite_replaces_only_the_tiles_the_tiler_wrote(scene):
    """A user's file among the tiles (a hand-corrected mask saved beside its tile) survives --overwrite; a tiler
    output folder whose manifest.json is another tool's is refused before any tiling."""
    folder, _, _ = scene
    args = ["--image", folder / "scene.tif", "--mask", folder / "scene_mask.tif", "-o", folder / "t"]
    assert tool("split_big_image_to_tiles", *args, "--tile-size", "128").returncode == 0
    fixed = folder / "t" / "gt" / "scene_r0000_c0000_fixed.png"
    write_image(fixed, np.full((128, 128), 255, np.uint8))
    assert tool("split_big_image_to_tiles", *args, "--tile-size", "100", "--overwrite").returncode == 0
    assert fixed.is_file() and (read_image(fixed) == 255).all()
    assert all(read_image(p).shape[0] == 100 for p in (folder / "t" / "images").iterdir())
    (folder / "other").mkdir()
    (folder / "other" / "manifest.json").write_text(json.dumps({"images": [{"id": 1, "file": "a.png"}]}))
    assert_user_error(tool("split_big_image_to_tiles", "--image", folder / "scene.tif", "-o", folder / "other"),
                      "manifest.json without the tiler's 'sources'", "another -o folder")
    assert sorted(p.name for p in (folder / "other").iterdir()) == ["manifest.json"]
    (folder / "t" / "manifest.json").write_text('{"sources": {"scene": {"height": 30')  # cut short
    assert_user_error(tool("split_big_image_to_tiles", *args, "--tile-size", "128", "--overwrite"),
                      "manifest.json: not complete JSON")


def test_stitch_passes_over_foreign_manifests_and_far_flung_tile_names(tmp_path):
    (tmp_path / "t").mkdir()
    for x in (0, 6):
        write_image(tmp_path / "t" / f"s_r0000_c{x:04d}.png", np.full((10, 10), 1, np.uint8))
    (tmp_path / "manifest.json").write_text(json.dumps([{"label": "water"}]))  # a labelling tool's
    r = tool("stitch_tiles", tmp_path / "t", "-o", tmp_path / "o.png")
    assert r.returncode == 0 and "note:" in r.stdout and "not a manifest of split_big_image_to_tiles" in r.stderr \
        + r.stdout, r.stdout + r.stderr
    assert_user_error(tool("stitch_tiles", tmp_path / "t", "-o", tmp_path / "o2.png", "--manifest",
                           tmp_path / "manifest.json"), "not a manifest of split_big_image_to_tiles.py")
    write_image(tmp_path / "t" / f"s_r{10 ** 17}_c0000.png", np.full((10, 10), 1, np.uint8))
    assert_user_error(tool("stitch_tiles", tmp_path / "t", "-o", tmp_path / "o3.png"),
                      f"s_r{10 ** 17}_c0000.png: its name puts it at row {10 ** 17}", "move or rename it")


def test_in_place_conversion_keeps_permissions_and_bilevel_masks_read(tmp_path):
    masks = tmp_path / "gt"
    masks.mkdir()
    write_image(masks / "a.png", np.array([[0, 64, 128, 255]], np.uint8))
    (masks / "a.png").chmod(0o640)
    assert tool("convert_classes_in_masks", masks, "--map", "64:1 128:2 255:0").returncode == 0
    assert (masks / "a.png").stat().st_mode & 0o777 == 0o640
    bilevel = np.zeros((40, 50), bool)
    bilevel[10:20, 10:30] = True
    tifffile.imwrite(tmp_path / "b.tif", bilevel, compression="packbits")  # 1 bit per pixel
    assert read_image(tmp_path / "b.tif").tolist() == (bilevel * 255).astype(np.uint8).tolist()
    reader = RasterReader(tmp_path / "b.tif")
    assert reader.dtype == np.uint8 and (reader.read(5, 5, 20, 30) == (bilevel * 255)[5:25, 5:35]).all()


def test_output_folder_given_as_a_link_to_an_empty_folder(tmp_path):
    src = make_dataset(tmp_path / "all")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    r = tool("split_dataset", src / "train", "-o", tmp_path / "link", "--val", "0.5")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "train" / "images").is_dir()
