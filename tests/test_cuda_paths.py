"""Protects the CUDA code paths: device and precision choice, loss scaling in a training step, cuDNN/TF32,
pinned memory and torchrun's GPU and backend, on any machine (CUDA mocked); on a GPU, the same for real."""
import datetime
import socket

import pytest
import torch
import torch.distributed as dist

from carseg import distributed, runtime
import train
from config import EvaluateConfig
from conftest import tiny_config, write_kaggle_dataset
from carseg.distributed import World
from evaluate import evaluate_checkpoint
from inference import Predictor
from carseg.labels import BINARY_CLASSES
from carseg.checkpoint import load_checkpoint

CUDA, CPU = torch.device("cuda"), torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def machine(monkeypatch):
    """machine(gpus, mps=False, bf16=True): what torch reports about this machine's accelerators."""
    def describe(gpus: int, mps: bool = False, bf16: bool = True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    return describe


@pytest.fixture
def backend_flags():
    """cuDNN autotuning and TF32 off, and put back as they were after the test (they are process-wide;
    monkeypatch cannot restore torch.backends.cuda.matmul's, which are not attributes but C++ settings)."""
    saved = flags()
    set_flags(False, False, False)
    yield
    set_flags(*saved)


def flags() -> tuple:
    return torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


def set_flags(benchmark: bool, cudnn_tf32: bool, matmul_tf32: bool):
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = benchmark, cudnn_tf32
    torch.backends.cuda.matmul.allow_tf32 = matmul_tf32


# ---------------------------------------------------------------- runtime.resolve_device

@pytest.mark.parametrize("gpus, mps, expected", [(1, False, "cuda"), (2, True, "cuda"), (0, True, "mps"),
                                                 (0, False, "cpu")])
def test_auto_prefers_cuda_then_mps_then_cpu(machine, gpus, mps, expected):
    machine(gpus, mps)
    assert runtime.resolve_device("auto") == torch.device(expected)


@pytest.mark.parametrize("name, gpus", [("cuda", 1), ("cuda:0", 1), ("cuda:1", 2), ("cuda:7", 8)])
def test_a_visible_gpu_is_taken_as_named(machine, name, gpus):
    machine(gpus)
    assert runtime.resolve_device(name) == torch.device(name)


@pytest.mark.parametrize("name, gpus", [("cuda:1", 1), ("cuda:2", 2)])
def test_a_gpu_index_beyond_the_visible_ones_is_refused(machine, name, gpus):
    machine(gpus)
    with pytest.raises(ValueError, match=f"only {gpus} CUDA device"):
        runtime.resolve_device(name)


@pytest.mark.parametrize("name, gpus, mps, why", [("cuda", 0, True, "CUDA is not available"),
                                                  ("cuda:0", 0, False, "CUDA is not available"),
                                                  ("mps", 1, False, "MPS .* not available")])
def test_an_absent_accelerator_is_refused(machine, name, gpus, mps, why):
    machine(gpus, mps)
    with pytest.raises(ValueError, match=why):
        runtime.resolve_device(name)


def test_mps_is_taken_where_present(machine):
    machine(0, mps=True)
    assert runtime.resolve_device("mps") == torch.device("mps")


@pytest.mark.parametrize("name, why", [("gpu", "not a device name"), ("CUDA", "not a device name"),
                                       ("cuda:x", "not a device name"), ("cuda:-1", "not a device name"),
                                       ("", "not a device name"), ("meta", "unsupported device type"),
                                       ("xpu", "unsupported device type")])
def test_bad_device_names_are_refused(machine, name, why):
    machine(1, mps=True)
    with pytest.raises(ValueError, match=why):
        runtime.resolve_device(name)


# ---------------------------------------------------------------- runtime.resolve_precision

@pytest.mark.parametrize("bf16, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_precision_on_a_gpu_is_bf16_where_it_has_it_else_fp16(machine, bf16, expected):
    machine(1, bf16=bf16)
    assert runtime.resolve_precision("auto", CUDA) == expected


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_the_cpu_is_bf16_only_where_native(monkeypatch, native, expected):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: native)
    assert runtime.resolve_precision("auto", CPU) == expected


def test_auto_precision_on_mps_is_fp32():
    assert runtime.resolve_precision("auto", torch.device("mps")) == "fp32"


@pytest.mark.parametrize("precision, device, bf16", [("fp16", CUDA, False), ("fp16", CUDA, True), ("bf16", CUDA, True),
                                                     ("fp32", CUDA, False), ("bf16", CPU, False), ("fp32", CPU, False)])
def test_an_explicit_precision_the_device_runs_is_kept(machine, precision, device, bf16):
    machine(1, bf16=bf16)
    assert runtime.resolve_precision(precision, device) == precision


def test_fp16_on_the_cpu_is_refused(machine):
    machine(1)
    with pytest.raises(ValueError, match="fp16 is for GPUs"):
        runtime.resolve_precision("fp16", CPU)


def test_bf16_on_a_gpu_without_it_is_refused(machine):
    machine(1, bf16=False)
    with pytest.raises(ValueError, match="no bfloat16 support"):
        runtime.resolve_precision("bf16", CUDA)


# ---------------------------------------------------------------- runtime.grad_scaler

@pytest.mark.parametrize("device, precision, enabled", [(CUDA, "fp16", True), (CUDA, "bf16", False),
                                                        (CUDA, "fp32", False), (CPU, "fp16", False),
                                                        (CPU, "bf16", False), (CPU, "fp32", False)])
def test_loss_scaling_only_for_fp16_on_a_gpu(machine, device, precision, enabled):
    machine(1)  # a GradScaler("cuda") turns itself off where torch sees no CUDA
    scaler = runtime.grad_scaler(device, precision)
    assert scaler.is_enabled() is enabled


# ---------------------------------------------------------------- the scaler in train.train_one_epoch

def one_step(tmp_path, scaler, grad_clip=1.0):
    """train_one_epoch over one fixed batch on the CPU with `scaler`; returns (model, scaler)."""
    torch.manual_seed(0)
    cfg = tiny_config(tmp_path / "unused", tmp_path, grad_clip=grad_clip, epochs=1)
    model = train.build_model_for(cfg, BINARY_CLASSES)
    optimizer, scheduler = train.build_optimizer(cfg, model, steps_per_epoch=1)
    state = train.TrainState(model, optimizer, scheduler, scaler, val_groups=[], train_groups=[],
                             class_names=list(BINARY_CLASSES))
    run = train.Run(cfg, tmp_path, CPU, "fp32", train.build_loss(cfg, BINARY_CLASSES))
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, 48, 64, generator=generator)                     # (B, 3, H, W)
    masks = (torch.rand(4, 1, 48, 64, generator=generator) > 0.5).float()      # (B, 1, H, W)
    train.train_one_epoch(run, model, [(images, masks, None)], state, epoch=1)
    return model, scaler


class RecordingScaler:
    """A pass-through scaler that logs what the training step asks of it."""

    def __init__(self, calls):
        self.calls = calls

    def scale(self, loss):
        self.calls.append("scale")
        return loss

    def unscale_(self, optimizer):
        self.calls.append("unscale_")

    def step(self, optimizer):
        self.calls.append("step")
        optimizer.step()

    def update(self):
        self.calls.append("update")


@pytest.mark.parametrize("grad_clip, expected", [(1.0, ["scale", "unscale_", "clip", "step", "update"]),
                                                 (0.0, ["scale", "step", "update"])])
def test_the_step_scales_the_loss_and_unscales_before_clipping(tmp_path, monkeypatch, grad_clip, expected):
    calls = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: calls.append("clip") or clip(*a, **k))
    one_step(tmp_path, RecordingScaler(calls), grad_clip)
    assert calls == expected


def test_an_enabled_scaler_leaves_the_gradients_and_step_unchanged(tmp_path):
    """A power-of-two loss scale, taken off before clipping, gives exactly the unscaled step's gradients and weights."""
    plain, _ = one_step(tmp_path / "plain", torch.amp.GradScaler("cpu", enabled=False))
    scaled, scaler = one_step(tmp_path / "scaled", torch.amp.GradScaler("cpu", init_scale=2.0**12))
    for (name, p), q in zip(plain.named_parameters(), scaled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=f"gradient of {name}")
        torch.testing.assert_close(q, p, msg=f"weight {name}")
    assert scaler.get_scale() == 2.0**12  # no overflow: the scale stays until growth_interval clean steps


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_a_step_whose_scaled_gradients_overflow_is_skipped(tmp_path):
    """What fp16 loss scaling relies on: the step with infinite gradients leaves the weights as they were."""
    torch.manual_seed(0)
    before = train.build_model_for(tiny_config(tmp_path, tmp_path), BINARY_CLASSES).state_dict()
    model, scaler = one_step(tmp_path, torch.amp.GradScaler("cpu", init_scale=float("inf")))
    for name, value in model.state_dict().items():
        if "running" not in name and "num_batches" not in name:  # BatchNorm statistics update in the forward
            torch.testing.assert_close(value, before[name], msg=f"{name} changed in a skipped step")


# ---------------------------------------------------------------- runtime.configure_backends

@pytest.mark.parametrize("device", [CUDA, torch.device("cuda:1")])
def test_cuda_turns_on_cudnn_autotuning_and_tf32(backend_flags, monkeypatch, device):
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: pytest.fail("the CPU allocator setting on CUDA"))
    runtime.configure_backends(device)
    assert flags() == (True, True, True)


def test_the_cpu_keeps_freed_memory_and_leaves_cuda_settings_alone(backend_flags, monkeypatch):
    calls = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: calls.append("keep"))
    runtime.configure_backends(CPU)
    assert flags() == (False, False, False) and calls == ["keep"]


# ---------------------------------------------------------------- train.build_loaders

class Images(torch.utils.data.Dataset):
    """Four (image, mask, index) samples, standing in for SegmentationDataset."""

    def __init__(self, store=None, transform=None, normalization=None):
        self.store, self.normalization = store, normalization

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.rand(3, 8, 8), torch.zeros(1, 8, 8), i

    def reseed(self, seed):
        pass


@pytest.mark.parametrize("device, pinned", [(CUDA, True), (torch.device("cuda:1"), True), (CPU, False)])
def test_loaders_pin_memory_for_a_gpu_only(tmp_path, monkeypatch, device, pinned):
    monkeypatch.setattr(train, "SegmentationDataset", Images)
    cfg = tiny_config(tmp_path, tmp_path, batch_size=2)
    loaders = train.build_loaders(cfg, None, None, device, None, list(BINARY_CLASSES))
    assert [loader.pin_memory for loader in loaders] == [pinned, pinned]


# ---------------------------------------------------------------- distributed.device_for and start

# ("cuda", 0 GPUs) stays "cuda", so that resolve_device's error names the option as given.
@pytest.mark.parametrize("name, gpus, expected", [("auto", 4, "cuda:3"), ("cuda", 4, "cuda:3"), ("cuda", 0, "cuda"),
                                                  ("auto", 0, "auto"), ("cpu", 4, "cpu")])
def test_under_torchrun_each_process_takes_the_gpu_of_its_local_rank(machine, name, gpus, expected):
    machine(gpus)
    assert distributed.device_for(name, World(rank=7, size=8, local_rank=3)) == expected


@pytest.mark.parametrize("name", ["cuda:0", "cuda:3"])
def test_under_torchrun_a_numbered_gpu_is_refused(machine, name):
    machine(4)
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        distributed.device_for(name, World(rank=1, size=2, local_rank=1))


@pytest.mark.parametrize("name", ["auto", "cuda", "cuda:1", "cpu"])
def test_one_process_keeps_its_device_option(machine, name):
    machine(2)
    assert distributed.device_for(name, World()) == name


@pytest.fixture
def torchrun(monkeypatch):
    """torchrun(rank, size, local_rank): its environment for this process; joining the group and choosing
    the GPU are recorded instead of done. Returns the list of records."""
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: calls.append(("join", backend, kwargs)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))

    def launch(rank, size, local_rank):
        for name, value in dict(RANK=rank, WORLD_SIZE=size, LOCAL_RANK=local_rank, MASTER_ADDR="127.0.0.1",
                                MASTER_PORT=29500).items():
            monkeypatch.setenv(name, str(value))
        return calls
    return launch


def test_start_joins_nccl_on_its_own_gpu(torchrun):
    calls = torchrun(rank=3, size=4, local_rank=1)
    gpu = torch.device("cuda:1")
    assert distributed.start(gpu, timeout_minutes=5) == World(rank=3, size=4, local_rank=1)
    assert calls == [("set_device", gpu), ("join", "nccl", {"timeout": datetime.timedelta(minutes=5), "device_id": gpu})]


def test_start_joins_gloo_on_the_cpu(torchrun):
    calls = torchrun(rank=0, size=2, local_rank=0)
    assert distributed.start(CPU, timeout_minutes=5) == World(rank=0, size=2, local_rank=0)
    assert calls == [("join", "gloo", {"timeout": datetime.timedelta(minutes=5)})]


def test_start_without_torchrun_joins_nothing(torchrun, monkeypatch):
    calls = torchrun(rank=0, size=2, local_rank=0)
    monkeypatch.delenv("WORLD_SIZE")
    assert distributed.start(CUDA) == World() and calls == []


# ---------------------------------------------------------------- on a real GPU (scripts/gpu_check.sh)

@pytest.mark.cuda
@needs_cuda
def test_a_gpu_is_chosen_and_tuned(backend_flags):
    device = runtime.resolve_device("auto")
    assert device.type == "cuda"
    assert runtime.resolve_precision("auto", device) == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    runtime.configure_backends(device)
    assert flags() == (True, True, True)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("precision", ["auto", "fp16", "fp32"])
def test_training_on_the_gpu(kaggle_dir, tmp_path, backend_flags, precision):
    """A short run in each precision: finite losses, a loadable checkpoint, and fp16's loss scale saved for a resume."""
    cfg = tiny_config(kaggle_dir, tmp_path, device="cuda", precision=precision, epochs=1)
    result = train.train(cfg)
    assert torch.isfinite(torch.tensor([result["train_loss"], result["val_loss"]])).all()
    checkpoint = load_checkpoint(f"{result['run_dir']}/last.pt")
    assert ("scale" in checkpoint["scaler"]) is (precision == "fp16")


@pytest.fixture(scope="module")
def gpu_data(tmp_path_factory):
    return write_kaggle_dataset(tmp_path_factory.mktemp("kaggle"))


@pytest.fixture(scope="module")
def gpu_checkpoint(gpu_data, tmp_path_factory):
    """last.pt of a one-epoch tiny run on the GPU (training's cuDNN/TF32 settings undone after)."""
    saved = flags()
    result = train.train(tiny_config(gpu_data, tmp_path_factory.mktemp("gpu-run"), device="cuda", epochs=1))
    set_flags(*saved)
    return f"{result['run_dir']}/last.pt"


@pytest.mark.cuda
@needs_cuda
def test_the_gpu_scores_as_the_cpu_does(gpu_data, tmp_path, backend_flags, gpu_checkpoint):
    """evaluate.py in fp32 (TF32 off) on the GPU, through pinned memory, and on the CPU: the same Dice."""
    scores = {device: evaluate_checkpoint(EvaluateConfig(checkpoint=gpu_checkpoint, data_dir=str(gpu_data),
                                                         split="all", device=device, out_dir=str(tmp_path / device),
                                                         cache_dir="", num_samples=0, worst_k=0))
              for device in ("cuda", "cpu")}
    assert scores["cuda"]["full_res"]["images"] == scores["cpu"]["full_res"]["images"] > 0
    assert scores["cuda"]["full_res"]["dice"] == pytest.approx(scores["cpu"]["full_res"]["dice"], abs=1e-3)


@pytest.mark.cuda
@needs_cuda
def test_reduced_precision_inference_on_the_gpu_agrees_with_fp32(backend_flags, gpu_checkpoint):
    exact = Predictor.from_checkpoint(gpu_checkpoint, "cuda", "fp32")
    fast = Predictor.from_checkpoint(gpu_checkpoint, "cuda", "auto")
    assert fast.device.type == "cuda" and fast.precision in ("bf16", "fp16")
    images = torch.rand(4, 3, *reversed(exact.input_size), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fast.logits(images).sigmoid(), exact.logits(images).sigmoid(), atol=0.05, rtol=0)


@pytest.mark.cuda
@needs_cuda
def test_loaders_hand_the_gpu_pinned_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "SegmentationDataset", Images)
    train_loader, _ = train.build_loaders(tiny_config(tmp_path, tmp_path, batch_size=2), None, None, CUDA, None,
                                          list(BINARY_CLASSES))
    images, masks, _ = next(iter(train_loader))
    assert images.is_pinned() and masks.is_pinned()


@pytest.mark.cuda
@needs_cuda
def test_nccl_and_ddp_run_on_this_gpu(monkeypatch, tmp_path):
    """What torchrun training needs of the machine: an NCCL group (here of one process) and a DDP step over it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda:0"))
    try:
        total = torch.ones(3, device="cuda")
        dist.all_reduce(total)
        assert total.tolist() == [1.0, 1.0, 1.0]
        model = train.build_model_for(tiny_config(tmp_path, tmp_path), BINARY_CLASSES).cuda()
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0])
        ddp(torch.rand(2, 3, 48, 64, device="cuda")).mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    finally:
        dist.destroy_process_group()
