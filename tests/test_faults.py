"""Protects against faults: SIGKILL at random moments then resume, a crash mid-checkpoint, a checkpoint cut short,
a full disk."""
import dataclasses
import errno
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from carseg import atomic
import predict
import train
from config import PredictConfig
from conftest import REPO_ROOT, tiny_config, write_kaggle_dataset
from model import UNet
from carseg.checkpoint import checkpoint_for, load_checkpoint, save_checkpoint
from test_train import assert_same_training


def start_training(cfg_path: Path, resume: Path | None = None) -> subprocess.Popen:
    argv = [sys.executable, str(REPO_ROOT / "train.py"), "--config", str(cfg_path)]
    if resume is not None:
        argv += ["--resume", str(resume)]
    env = dict(os.environ, OMP_NUM_THREADS="1", NO_ALBUMENTATIONS_UPDATE="1")
    return subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def write_config(cfg, path: Path) -> Path:
    path.write_text(json.dumps(dataclasses.asdict(cfg)))
    return path


def wait_for_new_epoch(process, last: Path, timeout=120.0):
    """Block until `process` writes a newer last.pt (so training is under way) or exits."""
    before = last.stat().st_mtime_ns if last.exists() else 0
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if last.exists() and last.stat().st_mtime_ns != before:
            return
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_ends_bit_identical(tmp_path):
    data = write_kaggle_dataset(tmp_path / "data")
    base = tiny_config(data, tmp_path, epochs=20, batch_size=2)
    reference = dataclasses.replace(base, run_name="reference")
    process = start_training(write_config(reference, tmp_path / "reference.json"))
    assert process.wait(timeout=300) == 0, process.stderr.read().decode()

    killed = dataclasses.replace(base, run_name="killed")
    cfg_path = write_config(killed, tmp_path / "killed.json")
    run = Path(killed.out_dir) / "killed"
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    kills = 0
    for attempt in range(4):  # up to 3 kills, then let it finish
        process = start_training(cfg_path, run / "last.pt" if (run / "last.pt").exists() else None)
        if attempt < 3:
            # Kill at a random moment after training is under way: mid-step, mid-validation or
            # mid-checkpoint-write, wherever the delay lands.
            wait_for_new_epoch(process, run / "last.pt")
            time.sleep(rng.uniform(0.0, 0.6))
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()
                kills += 1
                load_checkpoint(run / "last.pt")  # whatever the kill hit, last.pt must load
                continue
        assert process.wait(timeout=300) == 0, f"seed {seed}: " + process.stderr.read().decode()
        break
    assert kills >= 1, f"seed {seed}: no kill landed while training ran"
    assert load_checkpoint(run / "last.pt")["epoch"] == 20
    assert_same_training(run, Path(reference.out_dir) / "reference")


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    model, config = UNet(base_channels=2, depth=1), {"image_width": 8, "image_height": 8, "threshold": 0.5}
    save_checkpoint(path, checkpoint_for(model, config, epoch=1))
    real_save = torch.save

    def torn_save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # half written...
        raise KeyboardInterrupt  # ...then the process is stopped

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, checkpoint_for(model, config, epoch=2))
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # the torn temporary file is gone


@pytest.mark.parametrize("kept", [0.5, 0.99, 100])
def test_a_checkpoint_cut_short_is_named_as_such(tmp_path, kept):
    """A copy or download that stopped early is named as a cut checkpoint, not as one that cannot be loaded safely."""
    path = tmp_path / "last.pt"
    save_checkpoint(path, checkpoint_for(UNet(base_channels=2, depth=1), {"image_width": 8, "image_height": 8,
                                                                          "threshold": 0.5}))
    data = path.read_bytes()
    kept = kept if isinstance(kept, int) else int(len(data) * kept)
    path.write_bytes(data[:kept])
    with pytest.raises(ValueError) as err:
        load_checkpoint(path)
    assert str(err.value).startswith(f"{path} is not a complete PyTorch checkpoint: it is cut short or damaged "
                                     f"({kept:,} bytes")
    assert "weights_only" not in str(err.value)


class DiskFull(io.BytesIO):
    def write(self, data):
        super().write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_an_error_and_leaves_no_half_written_mask(trained_checkpoint, tmp_path, monkeypatch):
    photos = sorted((Path(trained_checkpoint["data_dir"]) / "train").glob("*.jpg"))[:3]
    victim = photos[1].stem
    real_open = open

    def open_with_full_disk(path, mode="r", *args, **kwargs):
        if victim in str(path) and "w" in mode:
            real_open(path, mode).close()  # the temporary file exists, as on a real full disk
            return DiskFull()
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(atomic, "open", open_with_full_disk, raising=False)
    out = tmp_path / "out"
    cfg = PredictConfig(inputs=[str(p) for p in photos], out_dir=str(out),
                        checkpoint=trained_checkpoint["path"], device="cpu")
    written, failures = predict.predict_files(cfg)
    assert sorted(p.name for p in written) == sorted(f"{p.stem}_mask.png" for p in photos if p.stem != victim)
    assert list(failures) == [str(photos[1].resolve())] and "No space left" in failures[str(photos[1].resolve())]
    assert f"cannot write {out.resolve() / (victim + '_mask.png')}" in failures[str(photos[1].resolve())]
    assert sorted(p.name for p in out.iterdir()) == sorted([p.name for p in written] + ["quality.csv"])  # no tmp, no partial file


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    data = write_kaggle_dataset(tmp / "data")
    summary = train.train(tiny_config(data, tmp, epochs=1))
    return {"path": str(Path(summary["run_dir"]) / "best.pt"), "data_dir": str(data)}
