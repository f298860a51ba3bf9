"""serve.py as a real server process on 127.0.0.1: the REST API through an HTTP client, every bad request a 4xx with a
JSON error, concurrent requests, and the upload page in headless Chromium."""
import base64
import io
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import httpx
import numpy as np
import pytest
import tifffile
from conftest import GEO, ROOT, assert_user_error, broken_package, make_checkpoint, make_dataset, run_script

from fileio import read_image
from inference import Predictor


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("s") / "ds", n_train=1, n_val=3, size=(48, 80), dtype=np.uint16,
                        bands=("nir",), ext=".tif")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("m") / "best.pth", add_dirs=("nir",))


@pytest.fixture(scope="module")
def server(ckpt):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "serve.py", "-m", str(ckpt), "--port", str(port), "--max-upload-mb", "1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "slow"
        time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(20)


def upload(data, stem="v000", **files):
    """The multipart files of one request: the image and its nir band, or what a test sends instead."""
    default = {"file": (f"{stem}.tif", (data / "val" / "images" / f"{stem}.tif").read_bytes()),
               "nir": (f"{stem}.tif", (data / "val" / "nir" / f"{stem}.tif").read_bytes())}
    return {k: v for k, v in {**default, **files}.items() if v is not None}


def expected_mask(ckpt, data, stem="v000"):
    image = np.dstack([read_image(data / "val" / "images" / f"{stem}.tif"),
                       read_image(data / "val" / "nir" / f"{stem}.tif")])
    return Predictor.load(ckpt, device="cpu").predict(image).mask


def test_health_model_and_page(server):
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    info = httpx.get(server + "/model").json()
    assert [c["value"] for c in info["classes"]] == [0, 255] and info["bands"] == ["nir"] and info["channels"] == 4
    page = httpx.get(server + "/")
    assert "text/html" in page.headers["content-type"] and 'type="file"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere


def test_png_mask_in_label_values_as_predict_computes_it(server, ckpt, data):
    r = httpx.post(server + "/predict", files=upload(data))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    mask = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (48, 80) and set(np.unique(mask)) <= {0, 255}
    assert (mask == expected_mask(ckpt, data)).mean() > 0.999


def test_geotiff_keeps_its_georeference(server, data, tmp_path):
    image = read_image(data / "val" / "images" / "v001.tif")
    buf = io.BytesIO()
    tifffile.imwrite(buf, image, extratags=GEO)
    r = httpx.post(server + "/predict", params={"format": "tif"},
                   files=upload(data, "v001", file=("scene.tif", buf.getvalue())))
    assert r.status_code == 200 and r.headers["content-type"] == "image/tiff"
    with tifffile.TiffFile(io.BytesIO(r.content)) as t:
        assert t.pages[0].shape == (48, 80)
        for code, _, _, value, _ in GEO:
            assert np.allclose(np.ravel(t.pages[0].tags[code].value), value)


def test_json_and_overlay(server, ckpt, data):
    r = httpx.post(server + "/predict", params={"format": "json", "threshold": "0.3"}, files=upload(data))
    out = r.json()
    assert r.status_code == 200 and (out["width"], out["height"]) == (80, 48) and out["threshold"] == 0.3
    mask = cv2.imdecode(np.frombuffer(base64.b64decode(out["mask_png"]), np.uint8), cv2.IMREAD_UNCHANGED)
    assert [c["pixels"] for c in out["classes"]] == [int((mask == 0).sum()), int((mask == 255).sum())]
    assert sum(c["pixels"] for c in out["classes"]) == 48 * 80
    r = httpx.post(server + "/predict", data={"overlay": "true"}, files=upload(data))
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"


def big_tiff() -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.random.default_rng(0).integers(0, 10000, (600, 600, 3), dtype=np.uint16))
    return buf.getvalue()  # 2 MB, over the server's 1 MB limit


def damaged_tiff() -> bytes:
    """A Deflate-compressed TIFF whose header and tags read but whose pixels do not decode."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.random.default_rng(0).integers(0, 10000, (48, 80, 3), dtype=np.uint16),
                     compression="zlib", tile=(16, 16))
    raw = bytearray(buf.getvalue())
    raw[len(raw) // 2:len(raw) // 2 + 64] = bytes(64)
    return bytes(raw)


@pytest.mark.parametrize("how,status,needle", [
    ({"file": ("x.png", os.urandom(3000))}, 415, "not an image"),
    ({"file": ("damaged.tif", damaged_tiff())}, 422, "'damaged.tif': cannot be read"),
    ({"file": None}, 400, "no image"),
    ({"nir": None}, 400, "nir"),
    ({"file": ("grey.png", cv2.imencode(".png", np.zeros((48, 80), np.uint8))[1].tobytes())}, 422, "channel"),
    ({"file": ("broken.png", b"\x89PNG\r\n\x1a\n" + b"0" * 100)}, 422, "broken.png"),
    ({"file": ("big.tif", big_tiff())}, 413, "1 MB"),
    ({"params": {"format": "gif"}}, 400, "format=gif"),
    ({"params": {"threshold": "2"}}, 400, "threshold=2"),
    ({"params": {"threshold": "x"}}, 400, "threshold=x"),
])
def test_every_bad_request_gets_a_4xx_with_a_json_error(server, data, how, status, needle):
    how = dict(how)
    params = how.pop("params", {})
    r = httpx.post(server + "/predict", params=params, files=upload(data, **how))
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


def test_requests_that_are_not_uploads(server):
    r = httpx.post(server + "/predict", content=b"{}", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "multipart" in r.json()["error"]
    r = httpx.get(server + "/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server + "/predict")
    assert r.status_code == 405 and "error" in r.json()


def test_concurrent_requests_all_answered_alike(server, data):
    files = upload(data)
    with ThreadPoolExecutor(8) as ex:
        answers = list(ex.map(lambda _: httpx.post(server + "/predict", files=files, timeout=120), range(16)))
    assert [a.status_code for a in answers] == [200] * 16
    assert len({a.content for a in answers}) == 1


def test_start_up_mistakes_are_one_line(tmp_path, ckpt):
    assert_user_error(run_script("serve.py", "-m", tmp_path / "none.pth"), "none.pth")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert_user_error(run_script("serve.py", "-m", ckpt, "--port", s.getsockname()[1]), "--port")
    assert_user_error(run_script("serve.py", "-m", ckpt, "--port", "70000"), "65535")
    r = run_script("serve.py", "-m", ckpt, env=broken_package(tmp_path / "site", "fastapi"))
    assert_user_error(r, "serve.py needs fastapi", "requirements")


def chromium() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@pytest.mark.skipif(chromium() is None, reason="no Chromium here: apt-get install chromium (CI installs it)")
def test_upload_page_in_a_browser_shows_the_mask(server, data, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone
        page.goto(server + "/")
        page.wait_for_function("document.getElementById('about').textContent.includes('unet')")
        assert page.locator("#legend > span").count() == 2
        page.set_input_files("#file", str(data / "val" / "images" / "v002.tif"))
        page.set_input_files("#band-nir", str(data / "val" / "nir" / "v002.tif"))
        page.click("#go")
        page.wait_for_function("document.getElementById('mask').naturalWidth > 0", timeout=60000)
        assert page.evaluate("document.getElementById('overlay').naturalWidth") > 0
        assert "48 px" in page.text_content("#status") or "80 x 48" in page.text_content("#status")
        href = page.get_attribute("#download", "href")
        mask = cv2.imdecode(np.frombuffer(base64.b64decode(href.split(",", 1)[1]), np.uint8), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (48, 80) and set(np.unique(mask)) <= {0, 255}
        assert page.evaluate("document.documentElement.scrollWidth") <= 390  # fits the phone's width
        page.set_input_files("#file", {"name": "notes.png", "mimeType": "image/png", "buffer": b"not an image"})
        page.click("#go")
        page.wait_for_function("document.getElementById('status').className === 'error'")
        assert "not an image" in page.text_content("#status")
        browser.close()
