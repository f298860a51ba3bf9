"""Load benchmark of serve.py: bounded concurrent clients on loopback posting images of one size.

  python bench/serve_load.py -m logs/my_exp                      # 1,000 requests of 512 x 512, 4 clients
  python bench/serve_load.py -m my_bundle -n 200 -c 8 --size 1024

Starts serve.py on a free port of 127.0.0.1, makes random images of the model's bands and pixel type (TIFF), sends
a warm-up, then -n requests from -c clients, each waiting for its answer before sending the next. Prints requests/s,
latency percentiles, errors, and the server's resident memory after the warm-up and after the run.
"""
import argparse
import io
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parent.parent


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", required=True, help="checkpoint, experiment folder or bundle to serve")
    p.add_argument("-n", "--requests", type=int, default=1000, help="requests after the warm-up (1000)")
    p.add_argument("-c", "--clients", type=int, default=4, help="concurrent clients (4)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (512)")
    p.add_argument("--format", default="png", choices=["png", "tif", "json"], help="answer format (png)")
    return p


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(model: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "-m", model, "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    import httpx

    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            sys.exit(f"serve.py stopped: {proc.stderr.read().strip()}")
        time.sleep(0.2)
    sys.exit("serve.py did not answer /health in 120 s")


def request_files(info: dict, size: int) -> dict:
    """Random pixels in the model's range: the image's channels and one file per extra band."""
    rng = np.random.default_rng(0)
    dtype = np.dtype(info["dtype"])
    top = 1.0 if dtype.kind == "f" else min(np.iinfo(dtype).max, 10000)
    channels = info["channels"] - len(info["bands"])

    def tiff(c: int) -> bytes:
        buf = io.BytesIO()
        tifffile.imwrite(buf, (rng.random((size, size, c) if c > 1 else (size, size)) * top).astype(dtype))
        return buf.getvalue()

    return {"file": ("image.tif", tiff(channels)), **{b: (f"{b}.tif", tiff(1)) for b in info["bands"]}}


def main() -> None:
    import httpx

    args = get_args_parser().parse_args()
    proc, url = start_server(args.model)
    try:
        info = httpx.get(url + "/model").json()
        files = request_files(info, args.size)
        client = httpx.Client(timeout=300, limits=httpx.Limits(max_connections=args.clients))

        def one(_: int) -> tuple[float, int]:
            t0 = time.perf_counter()
            r = client.post(url + "/predict", params={"format": args.format}, files=files)
            return time.perf_counter() - t0, r.status_code

        for _ in range(3):
            one(0)
        warm = rss_mb(proc.pid)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as ex:
            results = list(ex.map(one, range(args.requests)))
        wall = time.perf_counter() - t0
        after = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    latency = sorted(t for t, _ in results)
    errors = sum(code != 200 for _, code in results)
    q = statistics.quantiles(latency, n=100)
    print(f"| model | image | clients | requests | req/s | p50 ms | p95 ms | errors | RSS after warm-up MB | "
          f"RSS after run MB |\n|---|---|---|---|---|---|---|---|---|---|\n"
          f"| {info['architecture']}/{info['encoder']} ({info['runtime']}) | {args.size}x{args.size} "
          f"{info['channels']} ch {info['dtype']} | {args.clients} | {args.requests} | {args.requests / wall:.2f} | "
          f"{q[49] * 1000:.0f} | {q[94] * 1000:.0f} | {errors} | {warm:.0f} | {after:.0f} |")


if __name__ == "__main__":
    main()
