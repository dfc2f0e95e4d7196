"""Training on several processes with torch.distributed: `torchrun --nproc-per-node N -m
torch_ref.train ...`.

torchrun (or any launcher that sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT) starts one
process per rank; `join_from_env` joins them into a group, gloo on the CPU and nccl on
CUDA. Every rank draws the same epoch order and rotation angles and trains on its own slice of
each global batch; DDP averages the gradients and BatchNorm normalises over the global batch
(`GlobalBatchNorm2d` on the CPU, where torch's SyncBatchNorm refuses to run; SyncBatchNorm on
CUDA). Rank 0 alone prints and writes the workdir.
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from flax_impl.common.errors import ConfigError, exit_at_once, first_line
from flax_impl.common.rendezvous import DEFAULT_TIMEOUT, DistributedError, wait_for_coordinator


@dataclasses.dataclass(frozen=True)
class Group:
    """This process's place in the run: rank `rank` of `world_size` (0 of 1: a single process)."""

    rank: int = 0
    world_size: int = 1

    @property
    def name(self) -> str | None:
        """This process in a multi-process run ("rank 0 of 2"); None for a single process."""
        return f"rank {self.rank} of {self.world_size}" if self.world_size > 1 else None

    @property
    def primary(self) -> bool:
        """Whether this process prints and writes the workdir (rank 0)."""
        return self.rank == 0

    def rows(self, count: int) -> slice:
        """This rank's contiguous share of `count` rows (the last rank takes any remainder)."""
        size = count // self.world_size
        stop = count if self.rank == self.world_size - 1 else (self.rank + 1) * size
        return slice(self.rank * size, stop)

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over all ranks (float64; a collective: every rank calls it)."""
        if self.world_size == 1:
            return values
        on = "cuda" if dist.get_backend() == "nccl" else "cpu"  # nccl reduces CUDA tensors only
        total = torch.tensor(values, dtype=torch.float64, device=on)
        dist.all_reduce(total)
        return total.tolist()

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.world_size > 1:
            dist.barrier()

    def gather(self, obj) -> list:
        """`obj` of every rank, in rank order (a collective: every rank calls it)."""
        if self.world_size == 1:
            return [obj]
        objects = [None] * self.world_size
        dist.all_gather_object(objects, obj)
        return objects


SINGLE = Group()


def environment_group() -> Group:
    """The Group torchrun's RANK and WORLD_SIZE describe (SINGLE without them)."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        raise ConfigError(f"RANK={os.environ.get('RANK')!r} and WORLD_SIZE="
                          f"{os.environ.get('WORLD_SIZE')!r} must be integers") from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"RANK must be in 0..{world_size - 1} (WORLD_SIZE={world_size}), got "
                          f"{rank}; launch with torchrun, or set both consistently")
    return Group(rank, world_size)


def join_from_env(device: torch.device, timeout: float = DEFAULT_TIMEOUT) -> Group:
    """Join the process group the environment describes (nothing for a single process).

    gloo on the CPU, nccl on CUDA (each rank on the GPU of its LOCAL_RANK); `timeout` seconds
    for every process to join and for each collective. DistributedError if they cannot.
    """
    group = environment_group()
    if group.world_size == 1:
        return group
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={group.world_size} but {' and '.join(missing)} unset; "
                          f"launch with torchrun, or set them to rank 0's host and a free port")
    address, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    if not port.isdigit():
        raise ConfigError(f"MASTER_PORT must be a port number, got {port!r}")
    if group.rank:
        wait_for_coordinator(address, int(port), timeout, "rank 0", "MASTER_ADDR and MASTER_PORT")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout))
    except Exception as error:  # torch raises DistStoreError, RuntimeError, ValueError here
        raise DistributedError(
            f"rank {group.rank} of {group.world_size} could not join the process group at "
            f"{address}:{port} ({first_line(error)}); "
            f"check that every rank started, with the same MASTER_ADDR, MASTER_PORT and "
            f"WORLD_SIZE") from None
    return group


class AllGather(torch.autograd.Function):
    """Every rank's `x`, stacked (world size, *x.shape), with gradients: a rank's own `x`
    receives the sum over ranks of the gradients of its row (an all-reduce)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[dist.get_rank()]


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch of all ranks, on any device.

    Each rank's per-channel mean and sum of squared deviations are gathered with a collective
    that carries gradients (`AllGather`) and combined exactly (Chan et al.'s parallel variance);
    the running statistics follow nn.BatchNorm2d's update with the global ones. With one
    process, or in eval mode, it is nn.BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        count = x.numel() // x.shape[1]  # per rank; every rank has the same batch size
        mean = x.mean(dim=(0, 2, 3))
        squares = ((x - mean[None, :, None, None]) ** 2).sum(dim=(0, 2, 3))
        gathered = AllGather.apply(torch.stack([mean, squares]))  # (ranks, 2, C)
        means, total_count = gathered[:, 0], count * gathered.shape[0]
        global_mean = means.mean(dim=0)
        squares = gathered[:, 1].sum(dim=0) + count * ((means - global_mean) ** 2).sum(dim=0)
        variance = squares / total_count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum or 1.0 / float(self.num_batches_tracked)  # None: average
                self.running_mean.lerp_(global_mean, factor)
                self.running_var.lerp_(squares / (total_count - 1), factor)
        # Written out: F.batch_norm passes no gradient to statistics given to it.
        scale = torch.rsqrt(variance + self.eps)
        if self.affine:
            scale = scale * self.weight
        shift = -global_mean * scale + (self.bias if self.affine else 0)
        return x * scale[None, :, None, None] + shift[None, :, None, None]

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """`module` with every nn.BatchNorm2d replaced by a GlobalBatchNorm2d holding its
        parameters and statistics (like SyncBatchNorm.convert_sync_batchnorm)."""
        if type(module) is nn.BatchNorm2d:
            like = module.weight if module.affine else module.running_mean
            converted = cls(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, device=like.device, dtype=like.dtype)
            converted.load_state_dict(module.state_dict())
            return converted
        for name, child in module.named_children():
            module.add_module(name, cls.convert(child))
        return module


def distribute(model: nn.Module, group: Group, device: torch.device) -> nn.Module:
    """The module a train step calls: `model` itself for one process; else `model` with
    global-batch BatchNorm (converted in place), wrapped in DistributedDataParallel."""
    if group.world_size == 1:
        return model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # "cuda" names the GPU join_from_env made current: this rank's LOCAL_RANK.
        return DistributedDataParallel(model, device_ids=[torch.cuda.current_device()],
                                       broadcast_buffers=False)
    model = GlobalBatchNorm2d.convert(model)
    # Every rank computes the same global statistics: no buffers to broadcast.
    return DistributedDataParallel(model, broadcast_buffers=False)


def leave(exit_code: int) -> int:
    """Leave the process group; return `exit_code` (a single process) or end the process with
    it. A failed run exits at once (its peers may be dead: a clean exit could wait on them)."""
    if dist.is_initialized():
        if not exit_code:
            dist.barrier()  # no rank tears its connections down while another still uses them
            dist.destroy_process_group()
        # Not through the interpreter's finalization either: gloo's threads torn down there
        # have aborted finished ranks ("terminate called without an active exception", SIGABRT).
        exit_at_once(exit_code)
    return exit_code
