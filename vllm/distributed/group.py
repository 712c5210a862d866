"""One tensor-parallel group over processes, as the layers use it.

The layers need two collectives (``vllm.lora.punica_wrapper.TPGroup``):
``all_reduce(t) -> t`` (sum over ranks) and ``all_gather(t, dim) -> t``
(rank order along ``dim``).  ``TensorParallelGroup`` provides them over a
``torch.distributed`` process group object built directly from a TCP store,
without ``init_process_group``: nothing global is set, so one process can host
several engines one after another (the tests do) and a group dies with its
owner.  Backend: NCCL for CUDA tensors, gloo for CPU tensors.

    rank 0 (engine process): init_tensor_parallel_group(0, world, port, device)   # hosts the store
    rank r (worker process): init_tensor_parallel_group(r, world, port, device)
"""
from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist

_STORE_TIMEOUT = datetime.timedelta(minutes=2)  # the rendezvous: all ranks join the store


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for the group's store)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TensorParallelGroup:
    """``rank`` of ``world_size`` processes; collectives over ``device`` tensors."""

    def __init__(self, process_group, rank: int, world_size: int, device: torch.device, store=None) -> None:
        self._pg = process_group
        self._store = store  # kept alive as long as the group
        self.rank = rank
        self.world_size = world_size
        self.device = device

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks.  Reduces in place when ``t`` is contiguous (callers pass fresh outputs)."""
        if self.world_size == 1:
            return t
        t = t.contiguous()
        self._pg.allreduce([t]).wait()
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's ``t`` concatenated along ``dim`` in rank order (same shape on every rank)."""
        if self.world_size == 1:
            return t
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        self._pg.allgather([parts], [t]).wait()
        return torch.cat(parts, dim=dim)

    def close(self) -> None:
        """Release the communicator (NCCL) now rather than at interpreter exit."""
        pg, self._pg = self._pg, None
        if pg is not None and hasattr(pg, "shutdown"):
            try:
                pg.shutdown()
            except RuntimeError:  # already torn down
                pass

    def barrier(self) -> None:
        self.all_reduce(torch.zeros(1, device=self.device))

    def __repr__(self) -> str:
        return f"TensorParallelGroup(rank={self.rank}, world_size={self.world_size}, device={self.device})"


def collective_timeout() -> datetime.timedelta:
    """How long one collective waits for the other ranks (``VLLM_COLLECTIVE_TIMEOUT`` seconds)."""
    from vllm import envs

    return datetime.timedelta(seconds=envs.VLLM_COLLECTIVE_TIMEOUT)


def _process_group(store, rank: int, world_size: int, device: torch.device):
    timeout = collective_timeout()
    if device.type == "cuda":
        if not dist.is_nccl_available():
            raise RuntimeError("tensor parallelism on CUDA needs NCCL, which this torch build lacks")
        options = dist.ProcessGroupNCCL.Options()
        if hasattr(options, "_timeout"):
            options._timeout = timeout
        try:
            return dist.ProcessGroupNCCL(store, rank, world_size, options)
        except TypeError:  # builds whose constructor takes no options object
            return dist.ProcessGroupNCCL(store, rank, world_size)
    if not dist.is_gloo_available():
        raise RuntimeError("tensor parallelism on CPU needs gloo, which this torch build lacks")
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)


def init_tensor_parallel_group(rank: int, world_size: int, port: int, device: torch.device | str,
                               host: str = "127.0.0.1") -> TensorParallelGroup:
    """Join (rank 0: host) the group's store on ``host:port`` and build the process group.

    Blocks until all ``world_size`` ranks have joined (up to 2 minutes).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a group of {world_size}")
    device = torch.device(device)
    if world_size == 1:
        return TensorParallelGroup(None, 0, 1, device)
    store = dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=_STORE_TIMEOUT)
    return TensorParallelGroup(_process_group(store, rank, world_size, device), rank, world_size, device, store)
