"""Protects predict.py under torchrun: the sharded submission is the one-process file, failures, kill and resume."""
import gzip
import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path

import psutil
import pytest
from PIL import Image

import predict
from carseg import submission
import train
from config import PredictConfig
from conftest import car_picture, tiny_config, write_kaggle_dataset
from carseg.distributed import World, shard
from launcher import EXITCODE, launch

pytestmark = pytest.mark.slow  # torchrun, real data or a browser: .ci/run runs them (--run-slow)

NAME = "sub.csv.gz"  # the same name in every run: a .gz header records it, and the bytes are compared
COUNT = 9  # photos: rank 0 of 2 predicts 4, rank 1 predicts 5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny model trained long enough (about 7 s) to draw car-shaped masks, not all-car or all-background."""
    tmp = tmp_path_factory.mktemp("run")
    cfg = tiny_config(write_kaggle_dataset(tmp / "data"), tmp, epochs=6, batch_size=2, lr=3e-2, warmup_epochs=0.5)
    return Path(train.train(cfg)["run_dir"]) / "best.pt"


def write_photos(folder: Path, count: int = COUNT, size=(96, 64)) -> Path:
    """`count` synthetic car photos of slightly different widths, named in input order."""
    folder.mkdir(parents=True)
    for i in range(count):
        image, _ = car_picture(i % 4, 1 + i % 3, size=(size[0] + i, size[1]))
        Image.fromarray(image).save(folder / f"car{i:02d}.jpg", quality=95)
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return write_photos(tmp_path_factory.mktemp("photos") / "in")


def predict_in_process(checkpoint, inputs, out: Path, **options):
    """The one-process run (plain `python predict.py`) into out/masks and out/NAME: returns (written, failures)."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = PredictConfig(inputs=[str(inputs)], out_dir=str(out / "masks"), checkpoint=str(checkpoint), device="cpu",
                        submission=str(out / NAME), batch_size=2, **options)
    return predict.predict_files(cfg)


@pytest.fixture(scope="module")
def single(checkpoint, photos, tmp_path_factory) -> Path:
    """The reference: one process's masks (single/masks) and submission (single/NAME)."""
    out = tmp_path_factory.mktemp("single")
    written, failures = predict_in_process(checkpoint, photos, out)
    assert failures == {} and len(written) == COUNT
    return out


def torchrun_args(checkpoint, inputs, out: Path, *extra):
    """predict.py's arguments for a run into out/masks and out/NAME (out is created)."""
    out.mkdir(parents=True, exist_ok=True)
    return [inputs, "--out-dir", out / "masks", "--checkpoint", checkpoint, "--device", "cpu",
            "--submission", out / NAME, "--batch-size", "2", *extra]


def rows(path: Path) -> list:
    return gzip.decompress(path.read_bytes()).decode().splitlines()


def files(folder: Path) -> dict:
    """Every file under `folder` (hidden ones included) by relative path: its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_as_single(out: Path, single: Path):
    """The run in `out` wrote what the one-process run wrote, byte for byte, and left nothing else."""
    assert (out / NAME).read_bytes() == (single / NAME).read_bytes()
    assert files(out) == files(single)  # masks identical; no shard, no temporary


def test_the_sharded_submission_is_the_one_process_file(checkpoint, photos, single, tmp_path):
    out = tmp_path / "two"
    result = launch("predict.py", torchrun_args(checkpoint, photos, out), nproc=2,
                    finished=lambda: (out / NAME).exists())
    lines = rows(out / NAME)
    assert lines[0] == "img,rle_mask" and [line.split(",")[0] for line in lines[1:]] == \
        sorted(p.name for p in photos.iterdir())  # every input exactly once, in input order
    assert len({line.split(",")[1] for line in lines[1:]}) == COUNT  # real masks, not all alike
    assert_same_as_single(out, single)
    # Rank 0 alone speaks (INFO); the other rank logs warnings and errors only.
    assert result.stderr.count("INFO predicting with") == 1 and result.stderr.count("INFO wrote masks") == 1


def test_an_unreadable_photo_on_rank_1_is_reported_by_rank_0_with_the_one_process_status(checkpoint, photos,
                                                                                         tmp_path, caplog):
    inputs = tmp_path / "in"
    shutil.copytree(photos, inputs)
    bad = inputs / "car99.jpg"  # sorts last: rank 1's block
    bad.write_bytes((photos / "car00.jpg").read_bytes()[:300])  # truncated inside the compressed data
    paths = sorted(inputs.iterdir())
    assert paths.index(bad) in shard(len(paths), World(rank=1, size=2))

    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as exit_info:
        predict.main([str(a) for a in torchrun_args(checkpoint, inputs, tmp_path / "one")])
    assert exit_info.value.code == 1
    errors = [f"ERROR {r.getMessage()}" for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "car99.jpg" in errors[0]

    out = tmp_path / "two"
    with pytest.raises(AssertionError, match="torchrun predict.py exited 1\n") as failed:
        launch("predict.py", torchrun_args(checkpoint, inputs, out), nproc=2)
    report = str(failed.value)
    assert 1 in {int(code) for code in EXITCODE.findall(report)}  # a rank's own exit status, as one process's
    assert re.findall(r"ERROR failed: .*", report) == errors  # once, by rank 0, in one process's words
    assert report.count(f"for {COUNT} photo(s)") == 1 and "; 1 input(s) failed" in report
    assert (out / NAME).read_bytes() == (tmp_path / "one" / NAME).read_bytes()  # the others' rows, as one process


def test_a_bad_option_ends_every_rank_at_once_with_its_message(checkpoint, photos, tmp_path):
    (tmp_path / "a-file").write_text("x")
    started = time.monotonic()
    with pytest.raises(AssertionError, match="exited 1") as failed:
        launch("predict.py", [photos, "--out-dir", tmp_path / "a-file", "--checkpoint", checkpoint, "--device", "cpu"],
               nproc=2, timeout=120)
    assert "error: --out-dir" in str(failed.value) and "a-file is not a folder" in str(failed.value)
    assert time.monotonic() - started < 60  # no rank waited for another in a collective
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def plant_leftovers(out: Path) -> int:
    """What killed runs of 2 and 4 processes leave: complete and partial shards, temporaries of dead
    writers (out/masks must exist). Returns the dead writers' process id."""
    dead = dead_pid()
    (out / f".{NAME}.rank1-of-2").write_bytes(gzip.compress(b"car00.jpg,1 2\n"))  # finished before the kill
    (out / f"..{NAME}.rank0-of-2.{dead}.tmp").write_bytes(b"car0")  # killed mid-write
    (out / f"..{NAME}.rank3-of-4.{dead}.tmp").write_bytes(b"")
    (out / f".{NAME}.{dead}.tmp").write_bytes(b"img,rle_mask\n")  # a one-process run's streamed rows
    (out / "masks" / f".car03_mask.png.{dead}.tmp").write_bytes(b"\x89PNG")  # a mask being written
    return dead


def dead_pid() -> int:
    """A process id that no process has now."""
    pid = 4_000_000
    while psutil.pid_exists(pid):
        pid -= 1
    return pid


def test_a_killed_run_resumes_under_another_process_count_to_the_same_files(checkpoint, photos, single, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(single / "masks", out / "masks")
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "masks").iterdir() if p.name != "quality.csv"}  # a table: updated
    for name in ("car01_mask.png", "car03_mask.png", "car07_mask.png"):  # rank 0, rank 1 and rank 2 of 3
        (out / "masks" / name).unlink()
        del kept[name]
    plant_leftovers(out)
    launch("predict.py", torchrun_args(checkpoint, photos, out, "--skip-existing"), nproc=3,
           finished=lambda: (out / NAME).exists())
    assert_same_as_single(out, single)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "masks").iterdir() if p.name in kept} == kept  # not redone


def kill_when(condition, target, timeout: float = 120):
    """Run target() in a thread; as soon as condition() holds, SIGKILL every process it started (all of
    torchrun's, by id). Returns True if the kill came before target() ended by itself."""
    thread = threading.Thread(target=target, daemon=True)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    thread.start()
    deadline = time.monotonic() + timeout
    while thread.is_alive() and not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    killed = thread.is_alive()
    for process in started:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    thread.join(timeout)
    psutil.wait_procs(started, timeout)  # gone, not zombies: a live writer's temporaries are rightly kept
    return killed


def test_a_sigkilled_torchrun_resumes_in_one_process_to_the_same_files(checkpoint, tmp_path):
    # Bigger photos, one per batch: the run lasts long enough for the kill to land while masks are written.
    photos = write_photos(tmp_path / "in", count=16, size=(640, 480))
    reference = tmp_path / "one"
    predict_in_process(checkpoint, photos, reference)
    out = tmp_path / "two"
    args = torchrun_args(checkpoint, photos, out)
    args[args.index("--batch-size") + 1] = "1"

    def run():
        try:
            launch("predict.py", args, nproc=2, env={"TMPDIR": str(tmp_path)})  # torchelastic's files too
        except AssertionError:
            pass  # killed: torchrun's own status is -9

    masks = out / "masks"
    kill_when(lambda: masks.is_dir() and len(list(masks.glob("*_mask.png"))) >= 3, run)
    if len(list(masks.glob("*_mask.png"))) < 16:  # killed while predicting (the usual case)
        assert not (out / NAME).exists()  # nothing that looks finished
    written, failures = predict_in_process(checkpoint, photos, out, skip_existing=True)
    assert failures == {} and len(written) == 16
    assert (out / NAME).read_bytes() == (reference / NAME).read_bytes()
    assert sorted(files(out)) == sorted(files(reference))  # no shard or temporary of the killed run is left
    assert files(out) == files(reference)


# ---------------------------------------------------------------- merge_submission, in process

SAMPLE = [("a.jpg", "1 3 10 2"), ("b.jpg", ""), ("c,d.jpg", "5 5"), ("e.jpg", "2 1"), ("f.jpg", "7 9 20 1")]


def write_rows(path, world, rows):
    with submission.submission_rows(str(path), world) as writer:
        for row in rows:
            writer.writerow(row)


@pytest.mark.parametrize("name", ["sub.csv", "sub.csv.gz"])
@pytest.mark.parametrize("size", [2, 3, 7])  # 7: more ranks than rows, some shards empty
def test_merged_shards_are_the_bytes_one_process_writes(tmp_path, name, size):
    one, out = tmp_path / "one", tmp_path / "merged"
    one.mkdir()
    out.mkdir()
    write_rows(one / name, World(), SAMPLE)
    for rank in range(size):
        block = shard(len(SAMPLE), World(rank, size))
        write_rows(out / name, World(rank, size), SAMPLE[block.start:block.stop])
    assert sorted(p.name for p in out.iterdir()) == [f".{name}.rank{r}-of-{size}" for r in range(size)]
    submission.merge_submission(out / name, size)
    assert (out / name).read_bytes() == (one / name).read_bytes()
    assert [p.name for p in out.iterdir()] == [name]  # the shards are gone


def test_shards_without_the_failed_photos_rows_merge_to_the_one_process_file(tmp_path):
    # Rank 1's only photo failed: its shard holds no row, as one process writes none for it.
    survivors = [row for row in SAMPLE if row[0] != "c,d.jpg"]
    one, out = tmp_path / "one", tmp_path / "merged"
    one.mkdir()
    out.mkdir()
    write_rows(one / NAME, World(), survivors)
    write_rows(out / NAME, World(0, 3), SAMPLE[:2])
    write_rows(out / NAME, World(1, 3), [])
    write_rows(out / NAME, World(2, 3), SAMPLE[3:])
    submission.merge_submission(out / NAME, 3)
    assert (out / NAME).read_bytes() == (one / NAME).read_bytes()
    assert rows(out / NAME) == ["img,rle_mask", "a.jpg,1 3 10 2", "b.jpg,", "e.jpg,2 1", "f.jpg,7 9 20 1"]


def test_a_missing_shard_is_an_error_naming_it_before_anything_is_written(tmp_path):
    write_rows(tmp_path / NAME, World(0, 2), SAMPLE[:2])
    with pytest.raises(FileNotFoundError, match=re.escape(f".{NAME}.rank1-of-2")):
        submission.merge_submission(tmp_path / NAME, 2)
    assert [p.name for p in tmp_path.iterdir()] == [f".{NAME}.rank0-of-2"]  # kept, no submission


def test_leftovers_of_killed_runs_are_removed_and_live_or_unrelated_files_kept(tmp_path):
    (tmp_path / "masks").mkdir()
    dead = plant_leftovers(tmp_path)
    live = os.getpid()  # a writer that still runs (this process): its temporaries stay
    keep = [f"..{NAME}.rank0-of-2.{live}.tmp", ".other.csv.gz.rank0-of-2", f"masks/.notes.txt.{dead}.tmp",
            f"masks/.car05_mask.png.{live}.tmp", "masks/car00_mask.png"]
    for name in keep:
        (tmp_path / name).write_bytes(b"x")
    predict.remove_leftovers(PredictConfig(inputs=["x"], out_dir=str(tmp_path / "masks"),
                                           submission=str(tmp_path / NAME)))
    # The one-process run's own temporary is removed when it starts writing (_text_file), not here.
    assert sorted(files(tmp_path)) == sorted(keep + [f".{NAME}.{dead}.tmp"])
