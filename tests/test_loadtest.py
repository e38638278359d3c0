"""Protects scripts/loadtest.py: its percentiles, RSS windows and report on hand-computed runs, its refusal of
non-loopback servers, stopping the server it started on Ctrl-C, and one tiny real run against serve.py."""
import json
import subprocess
import sys
import time

import psutil
import pytest
from conftest import car_picture
from PIL import Image

import loadtest
from loadtest import Answer


def fake_run(count=250, errors=(3, 7), ms=100):
    """count answers, one started every 0.1 s, each taking ms milliseconds; the indices in errors are 503s."""
    return [Answer(0.1 * i, 0.1 * i + ms / 1000, 503 if i in errors else 200, 1000 + i, 0 if i in errors else 5000,
                   '{"detail": "busy"}' if i in errors else "") for i in range(count)]


@pytest.mark.parametrize("values, q, expected", [
    ([15, 20, 35, 40, 50], 50, 35),
    ([15, 20, 35, 40, 50], 40, 29),        # rank 1.6: 20 + 0.6 * (35 - 20)
    (list(range(1, 11)), 95, 9.55),        # rank 8.55: 9 + 0.55 * (10 - 9)
    (list(range(1, 11)), 99, 9.91),
    ([10, 1, 5], 0, 1), ([10, 1, 5], 100, 10), ([7], 99, 7),
])
def test_percentile_interpolates_between_closest_ranks(values, q, expected):
    assert loadtest.percentile(values, q) == pytest.approx(expected)


def test_percentile_of_nothing_is_an_error():
    with pytest.raises(ValueError):
        loadtest.percentile([], 50)


@pytest.mark.parametrize("count, size", [(250, 100), (150, 75), (1, 0)])
def test_windows_are_the_first_and_last_requests_and_never_overlap(count, size):
    answers = fake_run(count, errors=())[::-1]  # arrival order does not matter; start time does
    first, last = loadtest.split_windows(answers)
    assert [a.started for a in first] == pytest.approx([0.1 * i for i in range(size)])
    assert [a.started for a in last] == pytest.approx([0.1 * i for i in range(count - size, count)])


def test_mean_rss_averages_the_samples_inside_a_window_else_takes_the_nearest():
    answers = [Answer(1.0, 2.0, 200, 0, 0, ""), Answer(1.5, 3.0, 200, 0, 0, "")]
    samples = [(0.5, 100.0), (1.2, 200.0), (2.8, 400.0), (3.5, 900.0)]
    assert loadtest.mean_rss(samples, answers) == 300.0
    assert loadtest.mean_rss([(0.0, 50.0), (2.1, 70.0)], answers) == 70.0  # only the sample inside 1.0-3.0 counts
    assert loadtest.mean_rss([(0.0, 50.0), (9.0, 70.0)], answers) == 50.0  # nearest to the middle, 2.0
    assert loadtest.mean_rss([], answers) is None


def test_the_report_of_a_fake_run():
    answers = fake_run()
    samples = [(0.1 * i, 500.0 if i < 125 else 510.0) for i in range(251)]  # 10 MB more in the second half
    report = loadtest.summarize(answers, 25.0, samples, stopped_early=False)
    assert (report["requests_sent"], report["ok"], report["errors"]) == (250, 248, 2)
    assert report["requests_per_s"] == pytest.approx(248 / 25)
    assert report["latency_ms"] == pytest.approx({"p50": 100, "p95": 100, "p99": 100})
    assert report["error_examples"] == [{"status": 503, "detail": '{"detail": "busy"}'}] * 2
    rss = report["rss_mb"]
    assert (rss["window"], rss["first_mean"], rss["last_mean"], rss["peak"]) == (100, 500.0, 510.0, 510.0)
    assert (rss["growth_mb"], rss["growth_pct"]) == (10.0, 2.0)
    assert report["bytes_per_request"] == {"sent": round(1000 + 124.5), "received": 5000}
    table = loadtest.format_table([{"label": "openvino", **report, "rss_mb": {**rss, "idle": 480.0}}])
    for text in ("openvino", "248 / 250", "9.92", "+10.0", "+2.0", "480", "503 {\"detail\": \"busy\"}"):
        assert text in table


def test_a_run_without_rss_samples_reports_none():
    report = loadtest.summarize(fake_run(10, errors=()), 1.0, [], stopped_early=True)
    assert report["stopped_early"] and report["rss_mb"]["peak"] is None and report["rss_mb"]["growth_pct"] is None
    assert "-" in loadtest.format_table([{"label": "x", **report}])


def test_sending_stops_at_max_seconds_and_says_so(tmp_path, monkeypatch):
    def slow(client, url, photo, fields):
        time.sleep(0.05)
        return Answer(0, 0.05, 200, 1, 1, "")
    monkeypatch.setattr(loadtest, "send_one", slow)
    args = loadtest.parse_args(["--requests", "1000", "--concurrency", "2", "--max-seconds", "0.3"])
    answers, wall_s, stopped = loadtest.send_all("http://127.0.0.1:1", [tmp_path / "car.jpg"], args)
    assert stopped and 4 <= len(answers) < 40 and wall_s < 2


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:8000/", "https://127.0.0.9"])
def test_loopback_urls_are_accepted(url):
    loadtest.check_loopback(url)


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com", "http://0.0.0.0:8000",
                                 "http://127.0.0.1.example.com", "ftp://127.0.0.1", "127.0.0.1:8000"])
def test_other_urls_are_refused_before_anything_is_sent(url, tmp_path, monkeypatch):
    monkeypatch.setattr(loadtest, "send_one", lambda *a: pytest.fail("a request was sent"))
    with pytest.raises(SystemExit, match="loopback"):
        loadtest.main(["--url", url, "--photos", str(tmp_path)])


def test_a_folder_without_photos_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no photos")
    with pytest.raises(SystemExit, match=r"no photos .* in .*--photos"):
        loadtest.main(["--photos", str(tmp_path)])


def test_the_started_server_is_stopped_on_ctrl_c(tmp_path, monkeypatch):
    started = []

    def fake_server(*args, **kwargs):
        started.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
        return started[-1]

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(loadtest, "start_server", fake_server)
    monkeypatch.setattr(loadtest, "wait_for_health", interrupted)
    (tmp_path / "car.jpg").write_bytes(b"not read")
    with pytest.raises(KeyboardInterrupt):
        loadtest.main(["--photos", str(tmp_path), "--backend", "torch"])
    assert started[0].poll() is not None


def test_footprint_names_each_backends_package():
    footprint = loadtest.install_footprint()
    assert set(footprint) == {"torch", "onnxruntime", "openvino"}
    assert footprint["torch"]["mb"] > 10 and "cuda" in footprint["torch"]
    assert loadtest.distribution_mb("surely-not-an-installed-package") is None
    assert "torch" in loadtest.format_footprint(footprint)


@pytest.mark.slow
def test_a_tiny_real_run_against_the_server_it_starts(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.fromarray(car_picture(i, 1, (480, 320))[0]).save(photos / f"car{i}.jpg", quality=90)
    out = tmp_path / "run.json"
    status = loadtest.main(["--requests", "6", "--concurrency", "2", "--backend", "torch",
                            "--photos", str(photos), "--out", str(out)])
    assert status == 0
    run = json.loads(out.read_text())["runs"][0]
    assert (run["label"], run["ok"], run["errors"], run["requests_sent"]) == ("torch", 6, 0, 6)
    assert 0 < run["cold_start_s"]["health"] <= run["cold_start_s"]["first_answer"] < 120
    assert run["requests_per_s"] > 0 and 0 < run["latency_ms"]["p50"] <= run["latency_ms"]["p99"]
    assert run["rss_mb"]["window"] == 3 and 100 < run["rss_mb"]["idle"] <= run["rss_mb"]["peak"]
    assert run["bytes_per_request"]["received"] > 1000
    assert not psutil.pid_exists(run["server_pid"])
    assert "POST /api/segment 200" in (tmp_path / "run-torch-server.log").read_text()
    assert "requests/s" in capsys.readouterr().out


def fake_report(*args):
    return {"label": "torch", **loadtest.summarize(fake_run(10, errors=()), 1.0, [], stopped_early=False)}


@pytest.mark.parametrize("existing", ["run.json", "run-torch-server.log", "run-openvino-server.log"])
def test_an_existing_out_or_server_log_is_refused_before_any_server_starts(tmp_path, monkeypatch, existing):
    monkeypatch.setattr(loadtest, "start_server", lambda *args, **kwargs: pytest.fail("a server was started"))
    (tmp_path / "car.jpg").write_bytes(b"not read")
    (tmp_path / existing).write_text("earlier results")
    with pytest.raises(SystemExit, match=rf"^error: .*{existing} exists already: pass --overwrite to replace it"):
        loadtest.main(["--photos", str(tmp_path), "--backends", "torch", "openvino",
                       "--out", str(tmp_path / "run.json")])
    assert (tmp_path / existing).read_text() == "earlier results"


def test_out_is_replaced_with_overwrite_and_written_whole_or_not_at_all(tmp_path, monkeypatch):
    monkeypatch.setattr(loadtest, "measure_started", fake_report)
    (tmp_path / "car.jpg").write_bytes(b"not read")
    out = tmp_path / "run.json"
    out.write_text("earlier results")
    args = ["--photos", str(tmp_path), "--backend", "torch", "--out", str(out), "--overwrite"]

    def disk_full(fd):
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as patch:
        patch.setattr(loadtest.atomic.os, "fsync", disk_full)
        with pytest.raises(SystemExit, match=r"^error: .*cannot write .*run\.json: No space left"):
            loadtest.main(args)
    assert out.read_text() == "earlier results"  # not half of the new results
    assert sorted(p.name for p in tmp_path.iterdir()) == ["car.jpg", "run.json"]  # nor a temporary left
    assert loadtest.main(args) == 0
    assert json.loads(out.read_text())["runs"][0]["ok"] == 10


def test_an_out_folder_that_cannot_be_written_is_refused_before_any_server_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(loadtest, "start_server", lambda *args, **kwargs: pytest.fail("a server was started"))
    (tmp_path / "car.jpg").write_bytes(b"not read")
    with pytest.raises(SystemExit, match=r"^error: cannot write --out .*car\.jpg is not a folder"):
        loadtest.main(["--photos", str(tmp_path), "--out", str(tmp_path / "car.jpg" / "run.json")])


@pytest.mark.parametrize("args, words", [
    (["--pid", "123"], "--pid goes with --url"),
    (["--url", "http://127.0.0.1:8000", "--backend", "torch"], "--backend: --url tests a server already running"),
    (["--url", "http://127.0.0.1:8000", "--workers", "2", "--checkpoint", "x.pt"], "--workers --checkpoint: --url"),
    (["--backend", "torch", "--backends", "openvino"], "--backend and --backends"),
    (["--backends", "torch", "openvino", "torch"], "--backends: torch given more than once"),
    (["--workers", "0"], "--workers must be >= 1"),
])
def test_options_that_would_be_ignored_are_refused(args, words, capsys):
    with pytest.raises(SystemExit) as stop:
        loadtest.parse_args(args)
    assert stop.value.code == 2 and words in capsys.readouterr().err


@pytest.mark.parametrize("module", ["httpx", "psutil"])
def test_without_the_deploy_install_it_says_what_to_install(module, monkeypatch):
    import runpy
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: `import` raises ModuleNotFoundError
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(loadtest.__file__)
    assert stop.value.code == (f"loadtest.py needs {module}, which the base install leaves out: "
                               "pip install -r requirements-deploy.txt")
