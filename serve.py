"""Serve a trained model over HTTP: a REST endpoint for programs and an upload page for people.

  python serve.py -m logs/my_exp                          # then open http://127.0.0.1:8000
  python serve.py -m my_bundle --port 9000                # an exported bundle: no torch needed
  curl -F file=@scene.tif "http://127.0.0.1:8000/predict?format=tif" -o scene_mask.tif
  curl -F file=@a.tif -F nir=@a_nir.tif "http://127.0.0.1:8000/predict?format=json"

Endpoints:
  GET  /          the upload page: choose or drop an image, see image | mask | overlay, download the mask
  POST /predict   multipart: `file` (the image) and one file per extra band of the model, named by the band
                  (e.g. `nir`); query or form fields: format=png|tif|json (png), threshold (the model's), overlay
                  (png: return the overlay picture instead of the mask; json: add it)
  GET  /health    {"status": "ok"}
  GET  /model     the model's metadata: classes with their label values and colours, bands, pixel type, tile size

The mask comes back at the image's size in the dataset's label values; a GeoTIFF in gives a GeoTIFF out with its
georeference. The model is loaded once; requests are predicted one at a time (each uses every core or the GPU), at
most --queue of them wait, and each upload is at most --max-upload-mb. An image is judged by its header before a pixel
is decoded: one that declares more than --max-pixels is refused (413), so a few-KB file claiming 60,000 x 60,000 px
costs nothing; a prediction running longer than --timeout is abandoned (503) and the worker moves on. Uploads go to a
private temporary folder under fixed names and are removed after their answer. Every request is logged in one line.
Ctrl-C or SIGTERM stops the server within seconds, abandoning a prediction in progress. It binds 127.0.0.1: put a
reverse proxy in front to serve others.
"""
import argparse
import asyncio
import base64
import dataclasses
import json
import signal
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cli import Parser, add_runtime_flags, at_least, pixel_count, positive
from errors import UserError, require, run_cli
from fileio import image_header
from inference import Predictor, add_prediction_flags
from scenes import Done, Job, Settings, check_headers, predict_scene

PAGE = Path(__file__).resolve().parent / "serve.html"
FORMATS = {"png": "image/png", "tif": "image/tiff", "json": "application/json"}
MAGIC = {b"\x89PNG\r\n\x1a\n": ".png", b"\xff\xd8\xff": ".jpg", b"II*\x00": ".tif", b"MM\x00*": ".tif",
         b"II+\x00": ".tif", b"MM\x00+": ".tif", b"BM": ".bmp"}  # what the upload is, by its first bytes
PREVIEW_SIDE = 1024  # pictures the page shows are shrunk to this side


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__)
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", required=True,
                   help="best.pth / last.pth, an experiment folder (its best.pth) or a bundle folder from export.py")
    add_runtime_flags(g, workers=False)
    add_prediction_flags(p.add_argument_group("prediction"), "the model's, at most 384 on the CPU", None,
                         "default: a quarter megapixel on the CPU, 16 on a GPU")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (127.0.0.1: this machine only; 0.0.0.0 exposes it, see the README)")
    g.add_argument("--port", type=at_least(0), default=8000, help="port (8000)")
    g.add_argument("--max-upload-mb", type=at_least(1), default=64, help="largest request body, in MB (64)")
    g.add_argument("--queue", type=at_least(1), default=32,
                   help="requests that may wait for the model; more are answered 503, so memory stays bounded (32)")
    g.add_argument("--max-pixels", type=pixel_count, default=100_000_000,
                   help="largest image, in pixels, judged from its header before decoding (100M: 10,000 x 10,000); "
                        "a suffix k, M or G may be used")
    g.add_argument("--timeout", type=positive, default=300,
                   help="seconds one prediction may take before it is abandoned and answered 503 (300)")
    return p


def check_port(host: str, port: int) -> None:
    """Fail before the model loads when the address cannot be used."""
    if port > 65535:
        raise UserError(f"--port {port}: ports go up to 65535")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except socket.gaierror:
        raise UserError(f"--host {host}: not an address of this machine; use 127.0.0.1 or 0.0.0.0") from None
    except OSError as e:
        raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); choose another "
                        "--port") from None


# ------------------------------------------------------------------------------------------------------- model
class Abandoned(Exception):
    """A prediction stopped before its end: over --timeout, or the server is stopping."""


class Model:
    """The predictor, loaded once, and what a request needs from it; predict() runs in one worker thread only."""

    def __init__(self, args: argparse.Namespace):
        self.predictor = Predictor.load(Path(args.model), device="cpu" if args.cpu else args.device, amp=args.amp,
                                        tile_size=args.tile_size, overlap=args.overlap, tta=args.tta,
                                        threshold=args.threshold, batch_size=args.batch_size, for_scenes=True)
        self.meta = self.predictor.meta
        self.path, self.max_pixels, self.timeout = args.model, args.max_pixels, args.timeout
        self.stopping = threading.Event()  # set when the server is told to stop: the prediction in progress ends

    def info(self) -> dict:
        import visualize

        m, colors = self.meta, visualize.class_colors(self.meta.labels.num_classes)
        return {"model": Path(self.path).name, "architecture": m.arch, "encoder": m.encoder,
                "binary": m.binary, "threshold": self.predictor.threshold,
                "classes": [{"name": n, "value": int(v), "color": "#{:02x}{:02x}{:02x}".format(*colors[i])}
                            for i, (n, v) in enumerate(zip(m.class_names, m.labels.label_values(), strict=True))],
                "bands": m.add_dirs, "channels": m.in_channels, "dtype": m.types or m.dtype,
                "tile_size": self.predictor.tile_size, "max_pixels": self.max_pixels,
                "runtime": type(self.predictor.runner).__name__}

    def check(self, job: Job) -> None:
        """The uploads judged by their headers, before any pixel is decoded: too large (413), damaged or not fitting
        the model (422)."""
        for path in (job.image, *job.bands):
            header = image_header(path)
            if header is not None and header.pixels > self.max_pixels:
                raise BadRequest(413, f"{path} is {header.size()}; this server takes images up to "
                                      f"{self.max_pixels / 1e6:,.0f} Mpx (--max-pixels)")
        check_headers(self.predictor, [job], min_bytes=0)

    def predict(self, job: Job, threshold: float | None, overlay: bool) -> Done:
        """Write the job's mask (and overlay); abandoned past --timeout or when the server stops."""
        deadline = time.monotonic() + self.timeout

        def on_rows(*_) -> None:
            if self.stopping.is_set():
                raise Abandoned("the server is stopping; send the request again once it is back")
            if time.monotonic() > deadline:
                raise Abandoned(f"the prediction took longer than {self.timeout:g} s (--timeout) and was stopped; send "
                                "a smaller image, or start the server with a larger --timeout")

        predictor = self.predictor if threshold is None else dataclasses.replace(self.predictor, threshold=threshold)
        return predict_scene(predictor, job, Settings(overlay=overlay, progress=on_rows))


# ----------------------------------------------------------------------------------------------------- requests
class BadRequest(Exception):
    """A request the server cannot serve as sent: answered with its status and a JSON error."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def save_upload(data: bytes, folder: Path, stem: str, what: str) -> Path:
    """The upload under a fixed name (its own name is never used as a path), typed by its first bytes."""
    if not data:
        raise BadRequest(400, f"{what} is empty")
    ext = next((e for magic, e in MAGIC.items() if data.startswith(magic)), None)
    if ext is None:
        raise BadRequest(415, f"{what} is not an image: send PNG, JPEG, TIFF or BMP")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}{ext}"
    path.write_bytes(data)
    return path


def parse_options(fields: dict) -> tuple[str, float | None, bool]:
    fmt = str(fields.get("format") or "png").lower()
    if fmt not in FORMATS:
        raise BadRequest(400, f"format={fmt}: use png, tif or json")
    threshold = fields.get("threshold")
    if threshold not in (None, ""):
        try:
            threshold = float(threshold)
        except ValueError:
            threshold = -1.0
        if not 0.0 < threshold < 1.0:  # nan fails too
            raise BadRequest(400, f"threshold={fields['threshold']}: give a number between 0 and 1 (not 0 or 1)")
    else:
        threshold = None
    overlay = str(fields.get("overlay", "")).lower() in ("1", "true", "yes", "on")
    return fmt, threshold, overlay


def answer(model: Model, uploads: dict[str, tuple[str, bytes]], fields: dict) -> tuple[bytes, str]:
    """The response body and its media type for one /predict request."""
    fmt, threshold, overlay = parse_options(fields)
    if "file" not in uploads:
        raise BadRequest(400, "no image: send it as the multipart file field 'file'")
    missing = [b for b in model.meta.add_dirs if b not in uploads]
    if missing:
        raise BadRequest(400, f"the model also needs band(s) {', '.join(missing)}: send each as a file field named "
                              f"after it, e.g. {missing[0]}=@{missing[0]}.tif")
    with tempfile.TemporaryDirectory(prefix="segkit-serve-") as tmp:
        tmp = Path(tmp)
        image = save_upload(uploads["file"][1], tmp / "images", "upload", "the file")
        bands = [save_upload(uploads[b][1], tmp / "bands" / b, "upload", f"band {b}") for b in model.meta.add_dirs]
        # Messages name the files as the client sent them (a name only shown, never used as a path).
        shown = {str(p): repr(uploads[f][0] or f) for p, f in zip([image, *bands], ["file", *model.meta.add_dirs],
                                                                   strict=True)}
        (tmp / "out").mkdir()
        mask = tmp / "out" / ("mask.tif" if fmt == "tif" else "mask.png")
        job = Job(image, bands, mask, tmp / "out" / "prob.tif", tmp / "out" / "overlay.jpg")
        t0 = time.monotonic()
        try:
            model.check(job)
            done = model.predict(job, threshold, overlay or fmt == "json")
            if fmt == "png" and overlay:
                return job.overlay.read_bytes(), "image/jpeg"
            if fmt != "json":
                return mask.read_bytes(), FORMATS[fmt]
            return json.dumps(summary(model, job, done, time.monotonic() - t0)).encode(), FORMATS["json"]
        except (UserError, BadRequest) as e:
            message = str(e)
            for path, name in shown.items():
                message = message.replace(path, name)
            raise BadRequest(getattr(e, "status", 422), message.replace(str(tmp), "upload")) from None
        except Abandoned as e:
            raise BadRequest(503, str(e)) from None


def summary(model: Model, job: Job, done: Done, seconds: float) -> dict:
    """JSON: class pixel counts, the mask (label values, the PNG written) and pictures for the page, made from the
    prediction's thumbnails: nothing is decoded again."""
    import cv2

    import visualize

    step = max(1, -(-max(done.thumb_classes.shape) // PREVIEW_SIDE))
    colored = visualize.colorize(done.thumb_classes[::step, ::step], model.meta.labels.num_classes)
    preview = visualize.to_rgb8(done.thumb_image[::step, ::step])

    def encode(ext: str, picture: np.ndarray) -> str:
        return base64.b64encode(cv2.imencode(ext, cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))[1].tobytes()).decode()

    values, counted = model.meta.labels.label_values(), done.class_pixels
    return {"width": done.width, "height": done.height, "seconds": round(seconds, 3),
            "threshold": done.threshold if model.meta.binary else None,
            "classes": [{"name": n, "value": int(v), "pixels": int(c), "share": round(int(c) / max(done.pixels, 1), 6)}
                        for n, v, c in zip(model.meta.class_names, values, counted, strict=True)],
            "mask_png": base64.b64encode(job.mask.read_bytes()).decode(), "mask_color_png": encode(".png", colored),
            "image_jpg": encode(".jpg", preview), "overlay_jpg": base64.b64encode(job.overlay.read_bytes()).decode()}


# ----------------------------------------------------------------------------------------------------- the app
def build_app(model: Model, max_upload_mb: int, queue: int):
    """The FastAPI app: routes, JSON errors for everything, an upload limit and a bounded wait for the model."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, Response
    from starlette.requests import ClientDisconnect

    app = FastAPI(title="segkit", docs_url=None, redoc_url=None, openapi_url=None)
    answer_errors_and_log(app)
    admitted = threading.BoundedSemaphore(queue)
    # One thread predicts, decodes and encodes: requests queue for it, and its buffers come from one malloc arena
    # (a pool of threads each keeping its own grew the server by 430 MB over 1,000 requests).
    worker = ThreadPoolExecutor(1, thread_name_prefix="predict")
    limit = max_upload_mb * 2 ** 20

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE.read_text(encoding="utf-8")

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/model")
    def info():
        return model.info()

    @app.post("/predict")
    async def predict_endpoint(request: Request):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limit:
            return error(413, f"the request is {int(size) / 2 ** 20:.1f} MB; this server takes up to "
                              f"{max_upload_mb} MB")
        if not admitted.acquire(blocking=False):
            return error(503, "the server is busy; try again in a moment")
        try:
            uploads, fields = await read_form(request, limit, max_upload_mb)
            body, media = await asyncio.get_running_loop().run_in_executor(
                worker, answer, model, uploads, {**request.query_params, **fields})
            return Response(body, media_type=media)
        except BadRequest as e:
            return error(e.status, str(e))
        except ClientDisconnect:  # the client went away mid-upload: nobody to answer
            return Response(status_code=499)
        finally:
            admitted.release()

    return app


def error(status: int, message: str):
    """A JSON error answer."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


def answer_errors_and_log(app) -> None:
    """Every error as JSON (a fault as a one-line 500, its details in the log), and one log line per request."""
    from fastapi import Request
    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException):
        return error(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def server_error(_: Request, e: Exception):
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return error(500, f"the server failed on this request ({type(e).__name__}); its log says more")

    @app.middleware("http")
    async def log_request(request: Request, call_next):
        t0 = time.monotonic()
        response = await call_next(request)
        size = request.headers.get("content-length", "")
        size = f" {int(size) / 2 ** 20:.1f} MB" if size.isdigit() and int(size) > 2 ** 16 else ""
        print(f"{time.strftime('%H:%M:%S')} {request.method} {request.url.path} {response.status_code} "
              f"{time.monotonic() - t0:.2f} s{size}", flush=True)
        return response


async def read_form(request, limit: int, max_upload_mb: int) -> tuple[dict[str, tuple], dict[str, str]]:
    """The multipart body as {field: (file name, bytes)} and {field: text}, read no further than the limit (a body sent
    without its length is counted as it arrives)."""
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException
    from starlette.requests import Request

    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise BadRequest(400, "send the image as multipart/form-data with a file field named 'file'")
    received = 0

    async def receive():
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise BadRequest(413, f"the request is over {max_upload_mb} MB, the most this server takes")
        return message

    try:
        form = await Request(request.scope, receive).form(max_files=16, max_fields=16)
    except (HTTPException, MultiPartException) as e:  # the multipart parser's complaint about a malformed body
        raise BadRequest(400, f"the multipart body cannot be read: {getattr(e, 'detail', e)}") from None
    uploads, fields = {}, {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            uploads[key] = (value.filename or "", await value.read())
        else:
            fields[key] = value
    await form.close()
    return uploads, fields


def main(args: argparse.Namespace) -> int:
    require("serve.py", ("fastapi", "uvicorn"), "pip install -r requirements.txt, or requirements-infer.txt to serve "
            "a bundle without torch")
    check_port(args.host, args.port)
    model = Model(args)
    app = build_app(model, args.max_upload_mb, args.queue)
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            """Ctrl-C or SIGTERM: a prediction in progress stops at its next rows and the server ends with status 0
            (uvicorn's own handler would raise the signal again once stopped); a second Ctrl-C stops at once."""
            model.stopping.set()
            self.force_exit = self.should_exit and sig == signal.SIGINT
            self.should_exit = True

    m = model.meta
    print(f"serving {args.model} ({m.arch} / {m.encoder}, classes {', '.join(m.class_names)}, bands "
          f"{' + '.join(['image', *m.add_dirs])}) on http://{args.host}:{args.port} ; Ctrl-C stops", flush=True)
    Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                          timeout_graceful_shutdown=5)).run()
    print("server stopped", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
