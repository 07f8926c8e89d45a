"""Small torch.distributed helpers that work the same with one process and many."""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, in rank order (no gradient)."""
    return PendingGather(tensor).wait()


class PendingGather:
    """:func:`concat_all_gather` started without waiting: ``wait()`` returns the concatenation.

    With several ranks the collective runs in the background (gloo's worker threads, NCCL's
    stream) while this rank goes on computing, so it does not wait there for a slower rank;
    the ranks meet at the next collective that blocks instead. With one process it is done
    at once."""

    @torch.no_grad()
    def __init__(self, tensor: torch.Tensor):
        self._out: Optional[torch.Tensor] = tensor
        self._work = None
        if get_world_size() > 1:
            tensor = tensor.contiguous()
            self._parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
            self._work = dist.all_gather(self._parts, tensor, async_op=True)

    @torch.no_grad()
    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._out, self._work = torch.cat(self._parts, dim=0), None
            del self._parts
        return self._out


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (returns a new tensor; a no-op copy with one process)."""
    tensor = tensor.detach().clone()
    if get_world_size() > 1:
        dist.all_reduce(tensor)
        tensor /= get_world_size()
    return tensor


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    """Tear the process group down before the interpreter exits: left to interpreter
    shutdown, gloo's threads can be destroyed while still joinable, which aborts a finished
    run with SIGABRT ("terminate called without an active exception") on a loaded machine."""
    if is_initialized():
        dist.destroy_process_group()
