"""How a script runs on this machine: device choice, mixed precision, allocator and cuDNN settings.

Shared by train.py, evaluate.py and predict.py so the three scripts cannot drift apart in how they
pick a device or an autocast dtype.
"""
import contextlib
import ctypes
import logging
import platform

import torch

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """Turn 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps' into a device, or say why it is unavailable."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a device name (auto, cpu, cuda, cuda:N, mps): {err}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine "
                             "(no GPU, or a CPU-only PyTorch build); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS (Apple GPU) is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: unsupported device type {device.type!r}")
    return device


def cpu_has_bf16() -> bool:
    """True where oneDNN runs bf16 natively (AVX-512 BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_name() -> str:
    """The CPU's model name as the OS gives it (e.g. 'AMD EPYC 9R14'), else the architecture."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_description() -> str:
    """This CPU in a few words for logs and reports: its name and whether it runs bf16 natively, which
    decides what `--precision auto` means on it (bf16 where native, fp32 elsewhere)."""
    return f"{cpu_name()}, native bf16: {'yes' if cpu_has_bf16() else 'no'}"


def resolve_precision(precision: str, device: torch.device) -> str:
    """Pick 'fp32', 'bf16' or 'fp16' for `device`; 'auto' takes bf16 where it is native."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("--precision fp16 is for GPUs; on the CPU use bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("--precision bf16: this GPU has no bfloat16 support; use fp16 or auto")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        # It runs, with bf16's numerics, but emulated: the bundled U-Net predicted 8x slower than fp32 on an AVX2 CPU.
        log.warning("--precision bf16: this CPU (%s) has no native bf16, so PyTorch emulates it, several times "
                    "slower than fp32; --precision auto runs fp32 here", cpu_name())
    return precision


def autocast(device: torch.device, precision: str):
    """The autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """fp16 needs loss scaling against gradient underflow; bf16 and fp32 do not (the scaler is then inert)."""
    return torch.amp.GradScaler(device.type, enabled=(precision == "fp16" and device.type == "cuda"))


def configure_backends(device: torch.device):
    """cuDNN autotuning and TF32 on CUDA; keep big allocations cached on CPU."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif device.type == "cpu":
        keep_freed_memory()


def keep_freed_memory():
    """Stop glibc from returning freed activation buffers (>32 MB) to the kernel after every step.

    Re-mapping and zero-filling those pages each step made width-32+ U-Nets 1.25-1.5x slower on the
    2-core reference machine, at the price of 15-30 % more resident memory. mallopt is the in-process
    equivalent of MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=... MALLOC_TOP_PAD_=... at start-up.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc (macOS, musl): nothing to tune
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)
    libc.mallopt(m_top_pad, 1 << 30)


def release_freed_memory():
    """Hand memory freed by a one-off job back to the kernel (glibc's malloc_trim).

    After the ONNX export a long-lived process (serve.py) otherwise keeps the exporter's ~400 MB of
    freed buffers resident for its whole life (idle RSS 1040 MB against 750 MB when the export was cached).
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do
