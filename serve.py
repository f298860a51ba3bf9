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
most --queue of them wait, and each upload is at most --max-upload-mb. Uploads go to a private temporary folder under
fixed names and are removed after their answer. It binds 127.0.0.1: put a reverse proxy in front to serve others.
"""
import argparse
import asyncio
import base64
import json
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from cli import Parser, at_least
from errors import UserError, require, run_cli
from inference import add_prediction_flags

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
    g.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    g.add_argument("--device", default=None, help="device for checkpoints: 0, cuda:1, mps, cpu")
    add_prediction_flags(p.add_argument_group("prediction"), "the model's, at most 384 on the CPU", None,
                         "default: a quarter megapixel on the CPU, 16 on a GPU")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (127.0.0.1: this machine only; 0.0.0.0 exposes it, see the README)")
    g.add_argument("--port", type=at_least(0), default=8000, help="port (8000)")
    g.add_argument("--max-upload-mb", type=at_least(1), default=64, help="largest request body, in MB (64)")
    g.add_argument("--queue", type=at_least(1), default=32,
                   help="requests that may wait for the model; more are answered 503, so memory stays bounded (32)")
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
class Model:
    """The predictor, loaded once, and what a request needs from it; called from one worker thread only."""

    def __init__(self, args: argparse.Namespace):
        import predict

        self.predictor = predict.load_predictor(argparse.Namespace(**vars(args), amp="auto"))
        self.meta = self.predictor.meta
        self.default_threshold = self.predictor.threshold
        self.path = args.model

    def info(self) -> dict:
        import visualize

        m, colors = self.meta, visualize.class_colors(self.meta.labels.num_classes)
        return {"model": Path(self.path).name, "architecture": m.arch, "encoder": m.encoder,
                "binary": m.binary, "threshold": self.default_threshold,
                "classes": [{"name": n, "value": int(v), "color": "#{:02x}{:02x}{:02x}".format(*colors[i])}
                            for i, (n, v) in enumerate(zip(m.class_names, m.labels.label_values(), strict=True))],
                "bands": m.add_dirs, "channels": m.in_channels, "dtype": m.dtype,
                "tile_size": self.predictor.tile_size, "runtime": type(self.predictor.runner).__name__}

    def predict(self, image: Path, bands: list[Path], out: Path, threshold: float | None, overlay: bool) -> int:
        """Write out (mask) and, with overlay, out's _overlay.jpg; returns the pixels predicted."""
        import predict

        job = predict.Job(image, bands, out, out.with_name("prob.tif"), out.with_name("overlay.jpg"))
        options = SimpleNamespace(nodata=None, prob=None, overlay=overlay)
        self.predictor.threshold = self.default_threshold if threshold is None else threshold
        pixels, _ = predict.predict_scene(self.predictor, job, options)
        return pixels


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
    folder.mkdir(exist_ok=True)
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
        if not 0.0 <= threshold <= 1.0:
            raise BadRequest(400, f"threshold={fields['threshold']}: give a number between 0 and 1")
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
        bands = [save_upload(uploads[b][1], tmp / f"band{i}", "upload", f"band {b}")
                 for i, b in enumerate(model.meta.add_dirs)]
        # Messages name the files as the client sent them (a name only shown, never used as a path).
        shown = {str(p): repr(uploads[f][0] or f) for p, f in zip([image, *bands], ["file", *model.meta.add_dirs],
                                                                   strict=True)}
        out = tmp / "out" / ("mask.tif" if fmt == "tif" or (fmt == "json" and image.suffix == ".tif")
                             else "mask.png")
        out.parent.mkdir()
        t0 = time.monotonic()
        try:
            model.predict(image, bands, out, threshold, overlay or fmt == "json")
        except UserError as e:
            message = str(e)
            for path, name in shown.items():
                message = message.replace(path, name)
            raise BadRequest(422, message.replace(str(tmp), "upload")) from None
        if fmt == "png" and overlay:
            return (tmp / "out" / "overlay.jpg").read_bytes(), "image/jpeg"
        if fmt != "json":
            return out.read_bytes(), FORMATS[fmt]
        return json.dumps(summary(model, image, out, time.monotonic() - t0)).encode(), FORMATS["json"]


def summary(model: Model, image: Path, mask_path: Path, seconds: float) -> dict:
    """JSON: class pixel counts, the mask (label values, base64 PNG) and pictures for the page."""
    import cv2

    import visualize
    from fileio import read_image

    mask = read_image(mask_path)
    values = model.meta.labels.label_values()
    index = np.full(65536, 255, np.uint8)  # a value no class has (nodata) is drawn grey
    index[values] = np.arange(len(values))
    classes = index[mask]
    step = max(1, -(-max(mask.shape) // PREVIEW_SIDE))
    colored = visualize.colorize(classes[::step, ::step], model.meta.labels.num_classes)
    preview = visualize.to_rgb8(read_image(image)[::step, ::step])

    def encode(ext: str, picture: np.ndarray) -> str:
        if picture.ndim == 3:
            picture = cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)
        return base64.b64encode(cv2.imencode(ext, picture)[1].tobytes()).decode()

    counts = [int((mask == v).sum()) for v in values]
    return {"width": int(mask.shape[1]), "height": int(mask.shape[0]), "seconds": round(seconds, 3),
            "threshold": model.predictor.threshold if model.meta.binary else None,
            "classes": [{"name": n, "value": int(v), "pixels": c, "share": round(c / mask.size, 6)}
                        for n, v, c in zip(model.meta.class_names, values, counts, strict=True)],
            "mask_png": encode(".png", mask), "mask_color_png": encode(".png", colored),
            "image_jpg": encode(".jpg", preview),
            "overlay_jpg": base64.b64encode((mask_path.parent / "overlay.jpg").read_bytes()).decode()}


# ----------------------------------------------------------------------------------------------------- the app
def build_app(model: Model, max_upload_mb: int, queue: int):
    """The FastAPI app: routes, JSON errors for everything, an upload limit and a bounded wait for the model."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException

    app = FastAPI(title="segkit", docs_url=None, redoc_url=None, openapi_url=None)
    admitted = threading.BoundedSemaphore(queue)
    # One thread predicts, decodes and encodes: requests queue for it, and its buffers come from one malloc arena
    # (a pool of threads each keeping its own grew the server by 430 MB over 1,000 requests).
    worker = ThreadPoolExecutor(1, thread_name_prefix="predict")
    limit = max_upload_mb * 2 ** 20

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException):
        return error(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def server_error(_: Request, e: Exception):
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return error(500, f"the server failed on this request ({type(e).__name__}); its log says more")

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
        finally:
            admitted.release()

    return app


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

    m = model.meta
    print(f"serving {args.model} ({m.arch} / {m.encoder}, classes {', '.join(m.class_names)}, bands "
          f"{' + '.join(['image', *m.add_dirs])}) on http://{args.host}:{args.port} ; Ctrl-C stops", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
