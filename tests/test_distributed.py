"""DDP training: 2 Gloo processes against one process with the same global batch, every validation image
scored once, BatchNorm statistics gathered, resume under the same and another number of processes."""
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from carseg import distributed
import evaluate
import train
from carseg.batchnorm import GlooSyncBatchNorm, recompute_batchnorm, synchronise
from config import EvaluateConfig, TrainConfig
from conftest import tiny_config, write_coco_dataset, write_kaggle_dataset
from launcher import launch

pytestmark = pytest.mark.slow  # torchrun, real data or a browser: .ci/run runs them (--run-slow)

CARS = [f"cccccccccc{i:02d}" for i in range(1, 9)]  # 6 train cars x 3 views = 18 images, 2 validation cars = 6


# ---------------------------------------------------------------- the process group's bookkeeping

@pytest.mark.parametrize("count, size", [(0, 2), (1, 2), (5, 2), (6, 3), (7, 4), (100_064, 8)])
def test_shards_cover_every_item_once_in_order(count, size):
    blocks = [distributed.shard(count, distributed.World(rank, size)) for rank in range(size)]
    assert [i for block in blocks for i in block] == list(range(count))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_a_launch_environment_is_read_and_checked(monkeypatch):
    for name, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    assert distributed.current() == distributed.World(1, 2, 1) and not distributed.current().main
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="inconsistent launch: RANK=2"):
        distributed.current()
    monkeypatch.delenv("MASTER_PORT")
    with pytest.raises(ValueError, match="MASTER_PORT"):
        distributed.current()
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(name)
    assert distributed.current() == distributed.World()


# ---------------------------------------------------------------- BatchNorm across 2 Gloo processes

def _tiny_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Conv2d(4, 1, 1))


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 8, 8, generator=g) * 3 + 1 for _ in range(3)]


def _loss(logits):
    return logits.square().mean(dim=(1, 2, 3)).mean()


def _in_two_processes(rank, init_file, out_dir):
    """Each process: DDP + GlooSyncBatchNorm gradients on half of a batch; precise-BN over its own batches."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    world = distributed.World(rank, 2, rank)
    model = synchronise(_tiny_net(), torch.device("cpu"))
    batch = _batches()[0][2 * rank:2 * rank + 2]
    ddp = DistributedDataParallel(model)  # held: its gradient hooks go when it is collected
    _loss(ddp(batch)).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    plain = _tiny_net()  # no sync: process 0 takes batches 0 and 2, process 1 batch 1
    seen = recompute_batchnorm(plain, _batches()[rank::2], "cpu", "fp32", False, world)
    torch.save({"grads": grads, "synced_stats": model[1].running_mean.clone(), "seen": seen,
                "stats": {k: v.clone() for k, v in plain[1].state_dict().items()}}, Path(out_dir) / f"{rank}.pt")
    distributed.stop(world)


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("gloo")
    mp.spawn(_in_two_processes, args=(str(out / "init"), str(out)), nprocs=2)
    return [torch.load(out / f"{rank}.pt", weights_only=True) for rank in range(2)]


def test_synced_batchnorm_under_ddp_gives_the_one_process_gradient(two_process_results):
    model = _tiny_net()
    _loss(model(_batches()[0])).backward()  # one process, the whole batch of 4
    for result in two_process_results:
        for expected, got in zip((p.grad for p in model.parameters()), result["grads"]):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    one = _tiny_net().train()
    one(_batches()[0])  # the running statistics after one step see the global batch too
    torch.testing.assert_close(two_process_results[0]["synced_stats"], one[1].running_mean)


def test_precise_batchnorm_statistics_are_gathered_over_processes(two_process_results):
    one = _tiny_net()
    assert recompute_batchnorm(one, _batches(), "cpu", "fp32", False) == 12
    for result in two_process_results:
        assert result["seen"] == 12  # images over both processes
        for name, value in one[1].state_dict().items():
            torch.testing.assert_close(result["stats"][name], value, rtol=1e-5, atol=1e-6)


def test_gloo_sync_batchnorm_is_plain_batchnorm_outside_a_process_group():
    model = _tiny_net()
    synced = synchronise(_tiny_net(), torch.device("cpu"))
    assert isinstance(synced[1], GlooSyncBatchNorm) and synced[1].weight is synced[1].weight
    torch.testing.assert_close(synced(_batches()[0]), model(_batches()[0]))
    assert synced.state_dict().keys() == model.state_dict().keys()  # checkpoints load either way


# ---------------------------------------------------------------- train.py under torchrun

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(data folder, work folder, the options every run here shares as a config file)."""
    work = tmp_path_factory.mktemp("ddp")
    data = write_kaggle_dataset(work / "data", cars=CARS, views=3)
    # warmup_epochs=1: epoch 1's learning rates do not depend on --epochs, so a 1-epoch run resumed to 3
    # epochs takes the steps of a 3-epoch run.
    cfg = tiny_config(data, work, epochs=3, batch_size=2, lr=1e-2, warmup_epochs=1.0, augment="none",
                      val_fraction=0.25, precise_bn=8)
    path = work / "base.json"
    path.write_text(json.dumps({k: v for k, v in vars(cfg).items()}))
    return data, work, path


def history(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def run_finished(run_dir, epochs):
    return lambda: (Path(run_dir) / "metrics.jsonl").exists() and len(history(run_dir)) == epochs


def torchrun_train(work, config, run_name, epochs, *flags, nproc=2, resume=False):
    run_dir = work / "runs" / run_name
    args = ["--resume", run_dir / "last.pt"] if resume else ["--config", config, "--run-name", run_name]
    launch("train.py", [*args, "--epochs", epochs, *flags], nproc=nproc, finished=run_finished(run_dir, epochs))
    return run_dir


@pytest.fixture(scope="module")
def one_process(setup):
    """The reference: one process, global batch 4, 3 epochs."""
    data, work, config = setup
    cfg = TrainConfig(**{**json.loads(config.read_text()), "batch_size": 4, "run_name": "one"})
    return history(train.train(cfg)["run_dir"])


@pytest.fixture(scope="module")
def two_processes(setup):
    """2 Gloo processes x batch 2 with --sync-bn: 1 epoch, then resumed under torchrun to 3."""
    data, work, config = setup
    torchrun_train(work, config, "ddp", 1, "--sync-bn")
    return torchrun_train(work, config, "ddp", 3, resume=True)


def test_two_processes_follow_the_one_process_loss_curve(one_process, two_processes):
    # Measured here: epoch 1's training loss agrees to 1e-6 and the gap grows to 6.5e-4 by epoch 3, as
    # AdamW's first steps (about lr * sign(gradient)) turn float-rounding differences of near-zero
    # gradients into whole steps. Without --sync-bn (each process normalising over its 2 images) the
    # gaps are 1.6e-4 at epoch 1 and 4.4e-3 at epoch 3: both bounds below catch that.
    ddp = history(two_processes)
    assert [r["epoch"] for r in ddp] == [1, 2, 3] and [r["step"] for r in ddp] == [r["step"] for r in one_process]
    assert ddp[0]["train_loss"] == pytest.approx(one_process[0]["train_loss"], abs=2e-5)
    for mine, reference in zip(ddp, one_process):
        assert mine["train_loss"] == pytest.approx(reference["train_loss"], rel=2e-3)
        assert mine["val_loss"] == pytest.approx(reference["val_loss"], rel=5e-3)
        assert mine["lr"] == pytest.approx(reference["lr"], rel=1e-9)


def test_each_validation_image_is_scored_once_and_the_mean_is_one_process_s(setup, two_processes):
    """6 validation images over 2 processes (3 each): the recorded full-res Dice is the one-process mean."""
    ddp = history(two_processes)
    assert all(r["val_images"] == 6 for r in ddp)
    best = torch.load(two_processes / "best.pt", weights_only=True)
    assert best["world_size"] == 2 and best["val_groups"] == sorted(best["val_groups"]) and len(best["val_groups"]) == 2
    summary = evaluate.evaluate_checkpoint(EvaluateConfig(checkpoint=str(two_processes / "best.pt"),
                                                          data_dir=str(setup[0]), cache_dir="", device="cpu",
                                                          out_dir=str(setup[1] / "eval"), worst_k=1, num_samples=1))
    assert summary["full_res"]["images"] == 6
    assert summary["full_res"]["dice"] == pytest.approx(best["metrics"]["val_dice_full_res"], abs=1e-6)
    assert summary["model_res"]["dice"] == pytest.approx(best["metrics"]["val_dice_model_res"], abs=1e-6)


def test_the_synced_precise_batchnorm_statistics_are_one_process_s(setup, two_processes):
    """last.pt's statistics, recomputed over global batches of 4 split 2 + 2, equal one process's recompute."""
    last = torch.load(two_processes / "last.pt", weights_only=True)
    cfg = TrainConfig(**{**json.loads(setup[2].read_text()), "batch_size": 4})
    train_store, _, names = train.build_stores(cfg)
    model = train.build_model_for(cfg, names)
    model.load_state_dict(last["model"])
    train_set = train.build_loaders(cfg, train_store, train_store, torch.device("cpu"), model.normalization,
                                    names)[0].dataset
    recompute_batchnorm(model, train.batchnorm_batches(cfg, train_set, names), "cpu", "fp32")
    for name, value in model.state_dict().items():
        if "running" in name:
            torch.testing.assert_close(last["model"][name], value, rtol=1e-4, atol=1e-5)


def test_a_resume_under_the_same_processes_replays_the_run(setup, two_processes):
    """Epoch 3 after a resume equals epoch 3 of an uninterrupted 2-process run."""
    data, work, config = setup
    straight = torchrun_train(work, config, "ddp-straight", 3, "--sync-bn")
    for resumed, uninterrupted in zip(history(two_processes), history(straight)):
        for key in ("train_loss", "val_loss", "val_dice_full_res", "lr", "step"):
            assert resumed[key] == pytest.approx(uninterrupted[key], rel=1e-6, abs=1e-9), key


def test_a_resume_in_one_process_follows_the_schedule_and_says_what_changed(setup, two_processes, caplog):
    """2 processes x batch 2 (4 steps an epoch) resumed by one process x batch 2 (9 steps an epoch)."""
    data, work, config = setup
    copy = work / "runs" / "moved"
    copy.mkdir()
    (copy / "last.pt").write_bytes((two_processes / "last.pt").read_bytes())
    (copy / "config.json").write_bytes((two_processes / "config.json").read_bytes())
    ckpt = torch.load(copy / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["global_step"] == 12
    caplog.set_level("WARNING")
    summary = train.main(["--resume", str(copy / "last.pt"), "--epochs", "5"])
    assert "resuming with processes 2 -> 1, steps per epoch 4 -> 9:" in caplog.text
    records = history(copy)
    assert [r["step"] for r in records] == [4, 8, 12, 21, 30] and summary["epoch"] == 5
    cfg = json.loads(config.read_text())
    schedule = train.warmup_cosine(round(cfg["warmup_epochs"] * 9), 5 * 9)
    assert records[3]["lr"] == pytest.approx(cfg["lr"] * schedule(4 * 9), rel=1e-9)
    assert torch.load(copy / "last.pt", weights_only=True)["world_size"] == 1
    caplog.clear()  # resumed again as it ran last (1 process, 9 steps an epoch): nothing changed, nothing said
    train.main(["--resume", str(copy / "last.pt"), "--epochs", "6"])
    assert "resuming with" not in caplog.text and [r["step"] for r in history(copy)][-1] == 39


def test_too_few_precise_bn_images_for_the_processes_is_refused_before_training(setup):
    data, work, config = setup
    with pytest.raises(AssertionError, match=r"error: --precise-bn 1: each of the 2 processes needs at least one"):
        torchrun_train(work, config, "too-few", 1, "--precise-bn", "1")
    assert not (work / "runs" / "too-few" / "last.pt").exists()


def test_a_run_name_holding_files_is_refused_by_every_process_and_none_waits(setup):
    # The first process creates the run folder; its refusal must reach the others, which would otherwise
    # wait for a folder name until the process group times out.
    data, work, config = setup
    taken = work / "runs" / "taken"
    taken.mkdir(parents=True)
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(AssertionError) as failed:
        launch("train.py", ["--config", config, "--run-name", "taken", "--epochs", 1], timeout=300)
    assert str(failed.value).count(f"error: --run-name taken: {taken} exists and holds notes.txt") == 2
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"]


def test_two_processes_without_sync_bn_train_and_validate_every_image_once(setup):
    data, work, config = setup
    run_dir = torchrun_train(work, config, "ddp-local-bn", 1)
    record = history(run_dir)[0]
    assert record["val_images"] == 6 and record["step"] == 4
    summary = evaluate.evaluate_checkpoint(EvaluateConfig(checkpoint=str(run_dir / "best.pt"), data_dir=str(data),
                                                          cache_dir="", device="cpu", out_dir=str(work / "eval-local"),
                                                          worst_k=1, num_samples=1))
    assert summary["full_res"]["dice"] == pytest.approx(record["val_dice_full_res"], abs=1e-6)


def test_car_parts_under_two_processes_merge_one_confusion_matrix(tmp_path):
    """Multi-class validation: each process counts its images' pixels, and the merged confusion
    matrix gives the mIoU one process computes on the same weights (evaluate.py on best.pt)."""
    data = write_coco_dataset(tmp_path / "parts", count=14)
    cfg = tiny_config(data, tmp_path, epochs=1, batch_size=2, lr=1e-2, augment="none", val_fraction=0.25,
                      group_by="none")
    config = tmp_path / "parts.json"
    config.write_text(json.dumps(vars(cfg)))
    run_dir = torchrun_train(tmp_path, config, "parts", 1)
    record = history(run_dir)[0]
    summary = evaluate.evaluate_checkpoint(EvaluateConfig(checkpoint=str(run_dir / "best.pt"), data_dir=str(data),
                                                          cache_dir="", device="cpu", out_dir=str(tmp_path / "eval"),
                                                          worst_k=1, num_samples=1))
    assert record["val_images"] == summary["images"] == 4  # round(14 * 0.25) = 4 images, split 2 + 2
    assert summary["full_res"]["miou"] == pytest.approx(record["val_miou_full_res"], abs=1e-9)
    assert summary["full_res"]["pixel_accuracy"] == pytest.approx(record["val_pixel_accuracy_full_res"], abs=1e-12)
