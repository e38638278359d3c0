"""The process group a script runs in: one process (plain `python train.py`) or one of N under torchrun.

torchrun (PyTorch's own launcher) starts one process per device and tells each its place through
the environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). `start()` reads that
and joins the group: NCCL between GPUs, Gloo on CPUs. Without torchrun it returns a world of one
and every collective below is a no-op, so the scripts have a single code path.

    torchrun --standalone --nproc_per_node=2 train.py ...                  # one machine
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d \\
             --rdzv-endpoint=HOST:29500 --rdzv-id=carvana train.py ...    # on each of two machines
"""
import datetime
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """This process's place: rank in [0, size), local_rank = its index on its machine (its GPU)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launched: bool = field(default=False, compare=False)  # started by torchrun, whatever the size

    @property
    def main(self) -> bool:
        """Rank 0 logs, draws progress bars and writes the files every rank would write alike."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True in a process group: several processes, or torchrun's one. One process under torchrun
        takes the distributed path too (DDP, NCCL), so a single GPU can check it."""
        return self.launched or self.size > 1

    @property
    def bars(self):
        """tqdm's `disable` for this process: the first draws progress bars (None: where a terminal
        shows them), the others none, so that N processes do not draw N bars."""
        return None if self.main else True


SOLO = World()  # one process, outside torchrun: the default of every function that takes a World


def first_process() -> bool:
    """True in the process that speaks for the run: rank 0, or the only one. Read from RANK alone, so
    that it works before the launch environment is checked."""
    return os.environ.get("RANK", "0") == "0"


def log_level() -> int:
    """The logging level of a script's process: INFO for the first (or only) one, ERROR for the other
    ranks, whose warnings would repeat the first's (they see the same data and options)."""
    return logging.INFO if first_process() else logging.ERROR


def launched() -> bool:
    """True when torchrun (or another launcher following its protocol) started this process."""
    return "WORLD_SIZE" in os.environ


def launch_world() -> World:
    """The World torchrun's environment describes; ValueError naming the variable if it is inconsistent."""
    missing = [name for name in LAUNCH_VARIABLES if name not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE is set but {', '.join(missing)} is not: start the script with torchrun "
                         "(or unset WORLD_SIZE to run one process)")
    try:
        rank, size, local = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers, got "
                         + ", ".join(f"{n}={os.environ[n]!r}" for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK")))
    if not (size >= 1 and 0 <= rank < size and 0 <= local <= rank):
        raise ValueError(f"inconsistent launch: RANK={rank}, LOCAL_RANK={local}, WORLD_SIZE={size}")
    return World(rank, size, local, launched=True)


def current() -> World:
    """This process's World as the environment describes it, before (or without) joining the group."""
    return launch_world() if launched() else World()


def device_for(name: str, world: World) -> str:
    """The --device a rank uses: under torchrun 'auto'/'cuda' become this rank's own GPU, cuda:LOCAL_RANK.

    An explicit 'cuda:N' under torchrun with several processes on the machine would put them all on one
    GPU, so it is refused (ValueError); use CUDA_VISIBLE_DEVICES to choose the GPUs instead.
    """
    if not world.distributed:
        return name
    if name.startswith("cuda:"):
        raise ValueError(f"--device {name} under torchrun: each process takes the GPU of its LOCAL_RANK; "
                         "pass --device cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES")
    if name in ("cuda", "auto") and torch.cuda.is_available():
        return f"cuda:{world.local_rank}"
    return name  # 'cuda' without CUDA: resolve_device then names the option as given


def start(device: torch.device, timeout_minutes: float = 30) -> World:
    """Join torchrun's process group (NCCL for CUDA devices, Gloo otherwise); World() without torchrun.

    `timeout_minutes` bounds how long a collective waits for a rank that died or hangs. Raises
    ValueError on an inconsistent launch environment.
    """
    if not launched():
        return World()
    world = launch_world()
    if world.distributed and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        if world.main:  # torchrun's processes meet at once; a hand-set environment may wait for the others
            log.info("joining %d process(es) at %s:%s", world.size, os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs)
        if world.main:
            log.info("distributed: %d process(es), %s backend", world.size, backend)
    return world


def stop(world: World):
    """Leave the process group: a barrier first, so no rank tears down while another still talks to it."""
    if world.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def gather(obj, world: World) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank; [obj] in a world of one."""
    if not world.distributed:
        return [obj]
    gathered = [None] * world.size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast(obj, world: World):
    """Rank 0's `obj` on every rank (e.g. a run folder named from rank 0's clock)."""
    if not world.distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """The element-wise sum over ranks of a tensor on this rank's device (in place; returned)."""
    if world.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def shard(count: int, world: World) -> range:
    """This rank's share of `count` items: a contiguous block; the blocks cover every item exactly once.

    Blocks differ in length by at most one. Contiguous (not strided) so that rank outputs concatenated
    in rank order are in input order.
    """
    return range(world.rank * count // world.size, (world.rank + 1) * count // world.size)
