"""Where a stage runs: the torch device, its autocast dtype and the process's place in a distributed run.

Shared by training, evaluation and the registry's re-scoring; at the bottom of the package (torch and the two
bottom modules ``cpu_memory`` and ``errors``), so any layer may use it.
"""

from __future__ import annotations

import os

import torch

from pipeline.cpu_memory import keep_freed_memory
from pipeline.errors import ParamsError


def pick_device(choice: str) -> torch.device:
    """The device to run on; on the CPU, freed tensor memory is also kept for reuse (:mod:`pipeline.cpu_memory`)."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ParamsError("train.device is 'cuda' but no CUDA device is available: set train.device to auto or cpu")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(choice)
    if device.type == "cpu":
        keep_freed_memory()
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU (LOCAL_RANK)
    return device


def autocast_dtype(amp: bool, device: torch.device, cpu_amp: bool = False) -> torch.dtype | None:
    """bf16 autocast on CUDA when ``train.amp`` is on, on the CPU only with ``train.cpu_amp`` too (it pays off on
    CPUs with bf16 matmul units, AVX512-BF16 or AMX); None means full float32."""
    return torch.bfloat16 if amp and (device.type == "cuda" or cpu_amp) else None


def setup_distributed(device_choice: str) -> tuple[int, int]:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1), once: NCCL when training on CUDA (each
    rank on GPU ``LOCAL_RANK``), gloo on the CPU. Returns (rank, world size); (0, 1) in a plain process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and torch.distributed.is_available() and not torch.distributed.is_initialized():
        cuda = device_choice != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    return distributed_rank()


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) under ``torch.distributed`` (torchrun); (0, 1) in a plain process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
