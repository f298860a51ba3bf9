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
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import tifffile
from conftest import GEO, ROOT, assert_user_error, broken_package, make_checkpoint, make_dataset, run_script
from hostile import png_bomb, png_lying_chunk, tiff_bomb

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


def start_server(model, log, *flags) -> tuple[subprocess.Popen, str]:
    """serve.py on a free port, its output in the file `log`, once it answers /health."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "serve.py", "-m", str(model), "--port", str(port), *map(str, flags)],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "serve.py did not start"
        time.sleep(0.3)


def resident_mb(proc: subprocess.Popen) -> float:
    status = Path(f"/proc/{proc.pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


@pytest.fixture(scope="module")
def served(ckpt, tmp_path_factory):
    with open(tmp_path_factory.mktemp("log") / "serve.log", "w+") as log:
        proc, url = start_server(ckpt, log, "--max-upload-mb", "1")
        yield proc, url, log
        proc.terminate()
        proc.wait(20)


@pytest.fixture(scope="module")
def server(served):
    return served[1]


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


def tiff_of(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    rgb = image.ndim == 3 and image.shape[2] == 3
    tifffile.imwrite(buf, image, photometric="rgb" if rgb else "minisblack", planarconfig="contig")
    return buf.getvalue()


HOSTILE = {  # what a few-KB upload claims -> status and what the answer must say
    "tiff bomb": (("bomb.tif", tiff_bomb(60000, 60000)), 413, ["'bomb.tif' is 60000 x 60000 px (3,600.0 Mpx)",
                                                                   "100 Mpx (--max-pixels)"]),
    "png bomb": (("bomb.png", png_bomb(60000, 60000)), 413, ["60000 x 60000 px", "--max-pixels"]),
    "png chunk claiming 2 GB": (("chunk.png", png_lying_chunk()), 422, ["'chunk.png'", "corrupt",
                                                                         "claims 2,147,483,647 bytes"]),
    "tiff with tiles missing": (("short.tif", tiff_bomb(3000, 3000, rows_held=1000, bits=16)), 422,
                                ["'short.tif'", "corrupt", "holds 3 of the 9 tiles"]),
    "seven channels": (("wide.tif", tiff_of(np.zeros((48, 80, 7), np.uint16))), 422, ["channel"]),
    "8-bit image, 16-bit band": (("rgb8.tif", tiff_of(np.zeros((48, 80, 3), np.uint8))), 422,
                                 ["'rgb8.tif'", "image is uint8, uint16 in training"]),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_uploads_are_judged_by_their_header(served, data, case):
    """A small file that declares an enormous image, or whose parts contradict each other, is answered at once from
    its header; the server's memory stays where it was and it answers the next request."""
    proc, url, _ = served
    before = resident_mb(proc)
    upload_file, status, needles = HOSTILE[case]
    t0 = time.monotonic()
    r = httpx.post(url + "/predict", files=upload(data, file=upload_file), timeout=60)
    assert r.status_code == status and time.monotonic() - t0 < 10, r.text
    for needle in needles:
        assert needle in r.json()["error"], r.json()["error"]
    assert resident_mb(proc) < before + 100
    assert httpx.post(url + "/predict", files=upload(data), timeout=60).status_code == 200


def test_client_that_disconnects_mid_upload_is_one_log_line(served):
    _, url, log = served
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                  b"Content-Length: 900000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; "
                  b"filename=\"a.tif\"\r\n\r\n" + bytes(5000))
    time.sleep(1)
    assert httpx.get(url + "/health").status_code == 200
    log.flush()
    log.seek(0)
    text = log.read()
    assert "Traceback" not in text and "POST /predict 499" in text and "GET /health 200" in text, text[-2000:]


def test_timeout_frees_the_worker_and_sigterm_stops_a_busy_server(ckpt, tmp_path):
    """A prediction past --timeout is abandoned (503) and the next request is served; SIGTERM while a long
    prediction runs stops the server within seconds, answering that request, with no traceback."""
    big = {"file": ("big.tif", tiff_of(np.full((1500, 1500, 3), 5000, np.uint16))),
           "nir": ("big_nir.tif", tiff_of(np.full((1500, 1500), 5000, np.uint16)))}
    small = {"file": ("s.tif", tiff_of(np.full((48, 80, 3), 5000, np.uint16))),
             "nir": ("s_nir.tif", tiff_of(np.full((48, 80), 5000, np.uint16)))}
    with open(tmp_path / "serve.log", "w+") as log:
        proc, url = start_server(ckpt, log, "--timeout", "1")
        try:
            t0 = time.monotonic()
            r = httpx.post(url + "/predict", files=big, timeout=120)
            assert r.status_code == 503 and "--timeout" in r.json()["error"] and time.monotonic() - t0 < 15, r.text
            assert httpx.post(url + "/predict", files=small, timeout=60).status_code == 200
        finally:
            proc.terminate()
            proc.wait(20)
        proc, url = start_server(ckpt, log)
        with ThreadPoolExecutor(1) as ex:
            busy = ex.submit(httpx.post, url + "/predict", files=big, timeout=120)
            time.sleep(2)
            t0 = time.monotonic()
            proc.terminate()
            assert proc.wait(15) == 0 and time.monotonic() - t0 < 10
            assert busy.result().status_code == 503 and "stopping" in busy.result().json()["error"]
        log.seek(0)
        text = log.read()
    assert "Traceback" not in text and "server stopped" in text, text[-2000:]


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


def page_models(tmp_path) -> dict:
    """The models a user serves: a band model whose threshold validate.py --save-threshold tuned (0.34, not a step
    of 0.05), a named multi-class RGB model, and an exported bundle of the band model."""
    saved = make_checkpoint(tmp_path / "saved.pth", add_dirs=("nir",), threshold=0.34)
    multi = make_checkpoint(tmp_path / "multi.pth", values=(1, 2, 5), dtype="uint8", top=255.0,
                            names=("background", "building", "road", "bare land"))
    assert run_script("export.py", "-m", saved, "-o", tmp_path / "bundle").returncode == 0
    return {"saved threshold": saved, "multi-class": multi, "bundle": tmp_path / "bundle"}


@pytest.mark.skipif(chromium() is None, reason="no Chromium here: apt-get install chromium (CI installs it)")
def test_upload_page_predicts_with_every_kind_of_model(data, tmp_path):
    """The page's Predict button works with a saved threshold, a multi-class model and a bundle, and while it is
    disabled it says why (the band file still to choose)."""
    from playwright.sync_api import sync_playwright

    rgb = tmp_path / "rgb.png"
    cv2.imwrite(str(rgb), np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    with sync_playwright() as p, open(tmp_path / "serve.log", "w") as log:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        for kind, model in page_models(tmp_path).items():
            proc, url = start_server(model, log)
            try:
                page = browser.new_page()
                page.goto(url + "/")
                page.wait_for_function("document.getElementById('about').textContent.includes('unet')")
                if kind == "multi-class":
                    assert page.locator("#legend > span").count() == 4
                    assert "bare land (value 5)" in page.text_content("#legend")
                    assert page.is_hidden("#threshold-row")
                    page.set_input_files("#file", str(rgb))
                else:
                    assert page.input_value("#threshold") == "0.34"
                    page.set_input_files("#file", str(data / "val" / "images" / "v001.tif"))
                    assert page.is_disabled("#go") and "choose the nir band file too" in page.text_content("#why")
                    page.set_input_files("#band-nir", str(data / "val" / "nir" / "v001.tif"))
                assert page.is_enabled("#go") and page.text_content("#why") == ""
                page.click("#go")
                page.wait_for_function("document.getElementById('mask').naturalWidth > 0", timeout=60000)
                assert page.get_attribute("#status", "class") != "error", page.text_content("#status")
                if kind != "multi-class":
                    assert "0.34" in httpx.get(url + "/model").text
            finally:
                proc.terminate()
                proc.wait(20)
        browser.close()
