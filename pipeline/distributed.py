"""torchrun support: who am I among the extraction processes, and agreeing on outcomes.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) a ``torch.distributed`` process
group is formed through torchrun's rendezvous (NCCL on GPUs, gloo on CPUs). A plain run is a
group of one, with no process group at all, so the same code serves both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import PipeError


@dataclass(frozen=True)
class Workers:
    """This process's place among the processes of one extraction."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: torch.device) -> Workers:
        """Join torchrun's group when launched by it (``device`` picks NCCL or gloo)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        env = {k: int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
        if device.type == "cuda":
            torch.cuda.set_device(env["LOCAL_RANK"])
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(env["RANK"], world, env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"])

    def device(self, device: torch.device) -> torch.device:
        """One GPU per local rank; CPUs are shared."""
        return torch.device("cuda", self.local_rank) if device.type == "cuda" and self.distributed else device

    def shard(self, items: list) -> list:
        """This rank's share of ``items``: every world_size-th, starting at rank."""
        return items[self.rank::self.world_size]

    def leader_then_all(self, action):
        """Run ``action`` on the leader only; every rank gets its result, or raises its
        PipeError (so one bad input stops all ranks with the same message)."""
        outcome = [None, None]
        if self.is_leader:
            try:
                outcome = [action(), None]
            except PipeError as exc:
                outcome = [None, str(exc)]
        if self.distributed:
            dist.broadcast_object_list(outcome, src=0)
        if outcome[1] is not None:
            raise PipeError(outcome[1])
        return outcome[0]

    def gather(self, action) -> list:
        """Run ``action`` on every rank; all ranks get the list of results in rank order, or
        all raise the first rank's PipeError."""
        try:
            mine = (action(), None)
        except PipeError as exc:
            mine = (None, str(exc))
        results = [mine]
        if self.distributed:
            results = [None] * self.world_size
            dist.all_gather_object(results, mine)
        for _, error in results:
            if error is not None:
                raise PipeError(error)
        return [value for value, _ in results]

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
