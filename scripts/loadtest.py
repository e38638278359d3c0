"""Load-test serve.py: throughput, latency and memory while full-size photos arrive concurrently.

    python scripts/loadtest.py --requests 300 --concurrency 8 --backend openvino
    python scripts/loadtest.py --requests 300 --concurrency 8 --backends torch onnxruntime openvino --out loadtest.json
    python scripts/loadtest.py --url http://127.0.0.1:8000 --pid 1234   # a server already running (loopback only)

By default it starts `serve.py --port <free port> --backend X` itself, on 127.0.0.1, so it also measures
the cold start (spawn -> first /api/health -> first /api/segment answer), the idle RSS after that first
answer and the server's RSS (its child processes included, for --workers > 1) every 0.2 s through the
run; the mean RSS over the first and the last 100 requests shows whether memory stays flat. Photos
cycle through --photos, else $CARVANA_DIR/train, else data/carvana/train. Each backend gets a
fresh server; the table compares them, --out writes it all as JSON (and each server's log beside
it: --out run.json, run-<backend>-server.log), and the exit status is 1 when any request failed.
An existing --out or server log is replaced only with --overwrite, which is checked before the load
starts. A server started here is stopped however the script ends.
"""
import argparse
import importlib.metadata
import ipaddress
import itertools
import json
import mimetypes
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import NamedTuple

try:
    import httpx
    import psutil
except ModuleNotFoundError as missing:  # the base install (requirements.txt) has neither
    raise SystemExit(f"loadtest.py needs {missing.name}, which the base install leaves out: "
                     "pip install -r requirements-deploy.txt") from None

ROOT = Path(__file__).resolve().parents[1]  # the project, where serve.py is
sys.path.insert(0, str(ROOT))  # `python scripts/loadtest.py` puts scripts/ on the path, not the project

from carseg import atomic  # noqa: E402 (the project, found through the line above)

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
SAMPLE_EVERY_S = 0.2  # RSS sampling period
WINDOW = 100          # requests in the "first" and "last" RSS windows
FOOTPRINT_PACKAGES = ("torch", "onnxruntime", "openvino")


class Answer(NamedTuple):
    """One request as the client saw it; times are time.monotonic() seconds, status 0 = no HTTP answer."""
    started: float
    ended: float
    status: int
    sent: int
    received: int
    detail: str


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="requests to send (default: 300)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (default: 8)")
    parser.add_argument("--max-seconds", type=float, default=900.0,
                        help="stop sending after this many seconds of load, and say so (default: 900)")
    parser.add_argument("--backend", default="auto", help="serve.py --backend for the server started here")
    parser.add_argument("--backends", nargs="+", metavar="BACKEND", help="one fresh server and run per backend")
    parser.add_argument("--workers", type=int, default=1, help="serve.py --workers (default: 1)")
    parser.add_argument("--checkpoint", default="", help="serve.py --checkpoint (default: the bundled model)")
    parser.add_argument("--photos", type=Path, help="folder of photos to send (default: the Carvana train photos)")
    parser.add_argument("--output", default="cutout", choices=("cutout", "mask", "overlay"),
                        help="the answer asked for, as PNG (default: cutout)")
    parser.add_argument("--url", help="test this running server (http://127.0.0.1:PORT) instead of starting one")
    parser.add_argument("--pid", type=int, help="with --url: the server's process id, to sample its RSS")
    parser.add_argument("--start-timeout", type=float, default=600.0,
                        help="seconds the started server may take to answer (an ONNX export included)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here, and each started server's "
                                                 "log beside it (run.json: run-<backend>-server.log)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out and server logs")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.workers < 1 or args.max_seconds <= 0:
        parser.error("--requests, --concurrency and --workers must be >= 1, --max-seconds > 0")
    if args.url and args.backends:
        parser.error("--backends starts one server per backend: it cannot be combined with --url")
    # Options that would be silently ignored: the server's own ones with --url, --pid without it.
    ignored = [f"--{name.replace('_', '-')}" for name in ("backend", "workers", "checkpoint", "start_timeout")
               if args.url and getattr(args, name) != parser.get_default(name)]
    if ignored:
        parser.error(f"{' '.join(ignored)}: --url tests a server already running, which was started with its own")
    if args.pid and not args.url:
        parser.error("--pid goes with --url: the server started here is sampled by its own process id")
    if args.backends and args.backend != parser.get_default("backend"):
        parser.error("--backend and --backends: give the backends to compare with --backends only")
    repeated = sorted({b for b in args.backends or [] if args.backends.count(b) > 1})
    if repeated:
        parser.error(f"--backends: {', '.join(repeated)} given more than once")
    return args


# ---------------------------------------------------------------- pure parts

def percentile(values, q: float) -> float:
    """The q-th percentile (0-100) of values, interpolated linearly between closest ranks (NumPy's default)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def split_windows(answers, window: int = WINDOW) -> tuple:
    """(first, last): the first and the last `window` requests by start time, at most half of them
    each, so the two never overlap."""
    ordered = sorted(answers, key=lambda a: a.started)
    size = min(window, len(ordered) // 2)
    return (ordered[:size], ordered[len(ordered) - size:]) if size else ([], [])


def mean_rss(samples, answers):
    """Mean RSS (MB) of the (time, MB) samples taken while `answers` ran; the sample nearest their
    middle when none fell inside (a window shorter than the sampling period); None without samples."""
    if not samples or not answers:
        return None
    start, end = min(a.started for a in answers), max(a.ended for a in answers)
    inside = [mb for t, mb in samples if start <= t <= end]
    if inside:
        return statistics.fmean(inside)
    return min(samples, key=lambda s: abs(s[0] - (start + end) / 2))[1]


def check_loopback(url: str):
    """ValueError unless url is http(s) on a loopback address: this script floods what it targets."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme not in ("http", "https") or not loopback:
        raise ValueError(f"--url {url}: only a server on this machine's loopback address may be load-tested "
                         "(http://127.0.0.1:PORT, http://[::1]:PORT or http://localhost:PORT)")


def summarize(answers, wall_s: float, samples, stopped_early: bool) -> dict:
    """The run's numbers: throughput, latency of the successful requests, errors, bytes, RSS."""
    ok = [a for a in answers if a.status == 200]
    latencies = [1000 * (a.ended - a.started) for a in ok]
    errors = [a for a in answers if a.status != 200]
    first, last = split_windows(answers)
    first_mb, last_mb = mean_rss(samples, first), mean_rss(samples, last)
    growth = None if first_mb is None else last_mb - first_mb
    return {
        "requests_sent": len(answers), "ok": len(ok), "errors": len(errors), "stopped_early": stopped_early,
        "error_examples": [{"status": a.status, "detail": a.detail[:300]} for a in errors[:5]],
        "wall_s": round(wall_s, 2), "requests_per_s": round(len(ok) / wall_s, 3) if wall_s > 0 else None,
        "latency_ms": {name: round(percentile(latencies, q), 1) for name, q in (("p50", 50), ("p95", 95), ("p99", 99))}
        if latencies else {},
        "rss_mb": {"peak": round(max(mb for _, mb in samples), 1) if samples else None,
                   "window": len(first), "first_mean": _round(first_mb), "last_mean": _round(last_mb),
                   "growth_mb": _round(growth),
                   "growth_pct": None if growth is None else round(100 * growth / first_mb, 1)},
        "bytes_per_request": {"sent": _mean_int(a.sent for a in answers), "received": _mean_int(a.received for a in ok)},
    }


def _round(value, digits=1):
    return None if value is None else round(value, digits)


def _mean_int(values):
    values = list(values)
    return round(statistics.fmean(values)) if values else None


# ---------------------------------------------------------------- the table

ROWS = [  # (label, path in a report, format)
    ("requests ok / sent", None, None), ("errors", ("errors",), "{}"), ("stopped early (--max-seconds)", ("stopped_early",), "{}"),
    ("wall time (s)", ("wall_s",), "{:.1f}"), ("requests/s", ("requests_per_s",), "{:.2f}"),
    ("latency p50 (ms)", ("latency_ms", "p50"), "{:.0f}"), ("latency p95 (ms)", ("latency_ms", "p95"), "{:.0f}"),
    ("latency p99 (ms)", ("latency_ms", "p99"), "{:.0f}"),
    ("cold start: spawn -> health (s)", ("cold_start_s", "health"), "{:.1f}"),
    ("cold start: spawn -> first answer (s)", ("cold_start_s", "first_answer"), "{:.1f}"),
    ("RSS idle after warm-up (MB)", ("rss_mb", "idle"), "{:.0f}"), ("RSS peak (MB)", ("rss_mb", "peak"), "{:.0f}"),
    ("RSS mean, first N requests (MB)", ("rss_mb", "first_mean"), "{:.0f}"),
    ("RSS mean, last N requests (MB)", ("rss_mb", "last_mean"), "{:.0f}"),
    ("RSS last - first (MB)", ("rss_mb", "growth_mb"), "{:+.1f}"), ("RSS last - first (%)", ("rss_mb", "growth_pct"), "{:+.1f}"),
    ("bytes sent / request", ("bytes_per_request", "sent"), "{:,}"),
    ("bytes received / request", ("bytes_per_request", "received"), "{:,}"),
]


def _cell(report: dict, path, fmt) -> str:
    if path is None:
        return f"{report['ok']} / {report['requests_sent']}"
    value = report
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return "-" if value is None else fmt.format(value)


def format_table(reports) -> str:
    """One column per run, one row per measure; N is the RSS window's request count."""
    header = ["", *(f"{r['label']}" for r in reports)]
    rows = [header] + [[label, *(_cell(r, path, fmt) for r in reports)] for label, path, fmt in ROWS]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    windows = sorted({r["rss_mb"]["window"] for r in reports})
    lines.append(f"(N = {', '.join(map(str, windows))} requests; RSS includes the server's child processes)")
    for r in reports:
        lines += [f"{r['label']} error: {e['status']} {e['detail']}" for e in r["error_examples"]]
    return "\n".join(lines)


def format_footprint(footprint: dict) -> str:
    lines = ["Installed size on disk (sum of each distribution's files):"]
    for name, info in footprint.items():
        if info is None:
            lines.append(f"  {name}: not installed")
            continue
        line = f"  {name} {info['version']}: {info['mb']:,.0f} MB"
        if "cuda" in info:
            line += (f" - a CUDA {info['cuda']} build, plus {info['cuda_wheels_mb']:,.0f} MB of nvidia-*/triton wheels"
                     if info["cuda"] else " - a CPU-only build")
        lines.append(line)
    return "\n".join(lines)


# ---------------------------------------------------------------- footprint

def distribution_mb(name: str):
    """(version, MB on disk) of an installed distribution, or None when it is not installed."""
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    size = 0
    for file in dist.files or []:
        path = Path(dist.locate_file(file))
        size += path.stat().st_size if path.is_file() else 0
    return dist.version, size / 2 ** 20


def install_footprint() -> dict:
    """Disk size of each backend's packages; for torch, whether it is a CUDA build and its CUDA wheels."""
    result = {}
    for name in FOOTPRINT_PACKAGES:
        found = distribution_mb(name)
        result[name] = None if found is None else {"version": found[0], "mb": round(found[1], 1)}
    if result["torch"] is not None:
        import torch
        extras = {d.metadata["Name"] for d in importlib.metadata.distributions()
                  if d.metadata["Name"].lower().startswith("nvidia-") or d.metadata["Name"].lower() == "triton"}
        result["torch"]["cuda"] = torch.version.cuda
        result["torch"]["cuda_wheels_mb"] = round(sum(distribution_mb(n)[1] for n in extras), 1)
    return result


# ---------------------------------------------------------------- the server

def find_photos(folder: Path | None = None) -> list:
    """The photos to send: folder, else $CARVANA_DIR/train, else data/carvana/train (as train.py finds them); sorted."""
    if folder is None:
        folder = Path(os.environ.get("CARVANA_DIR") or ROOT / "data" / "carvana") / "train"
    photos = sorted(p for p in Path(folder).glob("*") if p.suffix.lower() in PHOTO_SUFFIXES) if Path(folder).is_dir() else []
    if not photos:
        raise FileNotFoundError(f"no photos ({', '.join(PHOTO_SUFFIXES)}) in {folder}: pass --photos DIR "
                                "or set CARVANA_DIR")
    return photos


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(backend: str, port: int, log_path: Path, workers: int = 1, checkpoint: str = "") -> subprocess.Popen:
    """serve.py on 127.0.0.1:port, its output to log_path."""
    command = [sys.executable, str(ROOT / "serve.py"), "--host", "127.0.0.1", "--port", str(port),
               "--backend", backend, "--workers", str(workers)] + (["--checkpoint", checkpoint] if checkpoint else [])
    with open(log_path, "wb") as log:
        return subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def stop_server(proc: subprocess.Popen, grace_s: float = 15.0):
    """Terminate the server and its children; kill whatever is still there after grace_s."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def wait_for_health(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float) -> dict:
    """/api/health's answer once the server gives one; RuntimeError if it exits or times out first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before answering:\n{_tail(log_path)}")
        try:
            response = httpx.get(url + "/api/health", timeout=5)
            if response.status_code == 200:
                return response.json()
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"the server did not answer /api/health within {timeout_s:g} s:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


def rss_mb(pid: int):
    """Resident memory (MB) of a process and all its children; None once it has gone."""
    try:
        process = psutil.Process(pid)
        total = process.memory_info().rss
        for child in process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.NoSuchProcess:
                pass
    except psutil.NoSuchProcess:
        return None
    return total / 2 ** 20


class RssSampler(threading.Thread):
    """Samples (time.monotonic(), MB) of a process tree every SAMPLE_EVERY_S until stop()."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.samples, self.done = pid, [], threading.Event()

    def run(self):
        while not self.done.is_set():
            mb = rss_mb(self.pid)
            if mb is not None:
                self.samples.append((time.monotonic(), mb))
            self.done.wait(SAMPLE_EVERY_S)

    def stop(self) -> list:
        self.done.set()
        self.join()
        return self.samples


# ---------------------------------------------------------------- the load

def send_one(client: httpx.Client, url: str, photo: Path, fields: dict) -> Answer:
    """POST one photo to /api/segment; any failure is an Answer, never an exception."""
    data = photo.read_bytes()
    kind = mimetypes.guess_type(photo.name)[0] or "application/octet-stream"
    started = time.monotonic()
    try:
        # shown(): a file name's bytes that are not UTF-8 cannot go into the form (httpx raised, killing the thread)
        response = client.post(url + "/api/segment", files={"image": (atomic.shown(photo.name), data, kind)},
                               data=fields)
        status, received = response.status_code, len(response.content)
        detail = "" if status == 200 else response.text[:300]
    except httpx.HTTPError as err:
        status, received, detail = 0, 0, f"{type(err).__name__}: {err}"
    return Answer(started, time.monotonic(), status, len(data), received, detail)


def send_all(url: str, photos: list, args) -> tuple:
    """args.requests requests, args.concurrency at a time, sending none after args.max_seconds:
    (answers, wall seconds, whether the time limit stopped it)."""
    answers, lock, counter, stopped = [], threading.Lock(), itertools.count(), threading.Event()
    fields = {"output": args.output, "format": "png"}
    started = time.monotonic()

    def worker(client):
        while (index := next(counter)) < args.requests:  # next() on a count is atomic under the GIL
            if time.monotonic() - started > args.max_seconds:
                stopped.set()
                return
            answer = send_one(client, url, photos[index % len(photos)], fields)
            with lock:
                answers.append(answer)
                if len(answers) % 50 == 0:
                    print(f"  {len(answers)}/{args.requests} answered", file=sys.stderr, flush=True)

    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    with httpx.Client(timeout=httpx.Timeout(300, connect=10), limits=limits) as client:
        threads = [threading.Thread(target=worker, args=(client,), daemon=True) for _ in range(args.concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return answers, time.monotonic() - started, stopped.is_set()


def run_load(url: str, photos: list, args, pid: int | None) -> dict:
    """send_all with the server's RSS sampled throughout (when its pid is known), summarized."""
    sampler = RssSampler(pid) if pid else None
    if sampler:
        sampler.start()
    try:
        answers, wall_s, stopped = send_all(url, photos, args)
    finally:
        samples = sampler.stop() if sampler else []
    return summarize(answers, wall_s, samples, stopped)


def server_log(out: Path, backend: str) -> Path:
    """Where the server started for `backend` writes its log (a line per request), beside --out."""
    return out.with_name(f"{out.stem}-{backend}-server.log")


def check_outputs(args):
    """FileExistsError or OSError, before any server starts, for an --out or server log that exists
    (without --overwrite) or a folder they cannot be written in: a refusal costs nothing then."""
    if not args.out:
        return
    paths = [args.out] + ([] if args.url else [server_log(args.out, b) for b in args.backends or [args.backend]])
    for path in paths:
        atomic.refuse_existing(path, args.overwrite, ", or give another --out")
    problem = atomic.folder_problem(args.out.absolute().parent)
    if problem:
        raise OSError(f"cannot write --out {args.out}: {problem}")


def measure_started(backend: str, photos: list, args) -> dict:
    """One backend on a fresh server: cold start, idle RSS after warm-up, then the load; the server
    is stopped however this ends."""
    port = free_port()
    if args.out:  # the server's log (a line per request) is kept beside the results
        log_path = server_log(args.out, backend)
    else:
        log_path = Path(tempfile.mkstemp(prefix=f"loadtest-{backend}-", suffix=".log")[1])
    spawned = time.monotonic()
    proc = start_server(backend, port, log_path, args.workers, args.checkpoint)
    try:
        url = f"http://127.0.0.1:{port}"
        health = wait_for_health(url, proc, log_path, args.start_timeout)
        health_s = time.monotonic() - spawned
        with httpx.Client(timeout=300) as client:
            first = send_one(client, url, photos[0], {"output": args.output, "format": "png"})
        if first.status != 200:
            raise RuntimeError(f"the first request failed: {first.status} {first.detail}\n{_tail(log_path)}")
        cold = {"health": round(health_s, 2), "first_answer": round(first.ended - spawned, 2)}
        time.sleep(1.0)  # let the first answer's buffers go before reading the idle size
        idle = rss_mb(proc.pid)
        print(f"{backend}: up in {cold['first_answer']:.1f} s, idle {idle:.0f} MB; sending {args.requests} "
              f"requests, {args.concurrency} at a time", file=sys.stderr, flush=True)
        report = run_load(url, photos, args, proc.pid)
    finally:
        stop_server(proc)
        if not args.out:  # errors quote its tail already
            log_path.unlink(missing_ok=True)
    _add_idle(report["rss_mb"], idle)
    return {"label": health["backend"], "backend_asked": backend, "health": _health_summary(health),
            "cold_start_s": cold, "server_pid": proc.pid, "server_log": atomic.shown(log_path) if args.out else None,
            **report}


def measure_running(url: str, photos: list, args) -> dict:
    """The load against a server already running at url (RSS only when --pid is given)."""
    health = httpx.get(url + "/api/health", timeout=10).raise_for_status().json()
    idle = rss_mb(args.pid) if args.pid else None
    report = run_load(url, photos, args, args.pid)
    _add_idle(report["rss_mb"], idle)
    return {"label": health.get("backend", url), "url": url, "health": _health_summary(health), **report}


def _add_idle(rss: dict, idle):
    """The RSS before the load goes in as idle, and counts towards the peak."""
    rss["idle"], rss["peak"] = _round(idle), _round(max((mb for mb in (idle, rss["peak"]) if mb is not None), default=None))


def _health_summary(health: dict) -> dict:
    return {k: health.get(k) for k in ("model", "arch", "backend", "precision", "device", "version")}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.url:
            check_loopback(args.url)
        photos = find_photos(args.photos)
        check_outputs(args)
        if args.url:
            reports = [measure_running(args.url.rstrip("/"), photos, args)]
        else:
            reports = [measure_started(backend, photos, args) for backend in args.backends or [args.backend]]
    except (OSError, ValueError, RuntimeError, httpx.HTTPError) as err:
        raise SystemExit(f"error: {atomic.shown(err)}")
    footprint = install_footprint()
    print(f"{args.requests} requests ({args.output} PNG of {len(photos)} photo(s), cycled), concurrency "
          f"{args.concurrency}, " + (f"server at {args.url}" if args.url else f"--workers {args.workers}"))
    print(format_table(reports))
    print(format_footprint(footprint))
    if args.out:
        settings = {k: atomic.shown(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        try:
            atomic.write_text(args.out, json.dumps({"settings": settings, "runs": reports, "footprint": footprint},
                                                   indent=2) + "\n")
        except OSError as err:  # the table above has the numbers
            raise SystemExit(f"error: {atomic.shown(err)}")
    return 1 if any(r["errors"] for r in reports) else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so a `kill` also stops the server started here
    sys.exit(main())
