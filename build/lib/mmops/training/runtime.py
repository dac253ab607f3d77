"""Where training runs: device, rank and precision, from one CPU to many GPUs under torchrun."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int
    world_size: int
    autocast_dtype: torch.dtype | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(device: str, precision: str) -> Runtime:
    """Device, rank and precision; joins the process group when launched by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch_device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    bf16 = precision == "bf16" or (precision == "auto" and use_cuda)
    return Runtime(torch_device, rank, world_size, torch.bfloat16 if bf16 else None)


def shutdown_runtime() -> None:
    """Leave the process group, if `setup_runtime` joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(runtime: Runtime) -> None:
    """Wait for every process; a no-op on one."""
    if runtime.world_size > 1:
        dist.barrier()


def autocast(runtime: Runtime) -> AbstractContextManager[object]:
    """Mixed precision where the runtime asks for it, else nothing."""
    if runtime.autocast_dtype is None:
        return nullcontext()
    return torch.autocast(runtime.device.type, dtype=runtime.autocast_dtype)
