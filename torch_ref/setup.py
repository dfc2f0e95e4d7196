"""One run of the PyTorch reference, set up: `setup_training(config, data, device)`.

Mirrors `flax_impl/setup.py`: the model, optimizer, schedule, random generator and the data as
tensors on the device (CPU or CUDA), on one process or as one rank of several
(`torch_ref.distributed`). Training (`torch_ref.train`), `compare.speed` and `compare.parity` all
start here.
"""

from __future__ import annotations

import dataclasses

import torch

from flax_impl.common.config import Config
from flax_impl.common.data import Mnist
from flax_impl.common.errors import ConfigError
from torch_ref.core import create_ema, create_optimizer, evaluate, train_step
from torch_ref.distributed import SINGLE, Group, distribute
from torch_ref.model import create_model


@dataclasses.dataclass
class Setup:
    """One run, ready to go: model, optimizer, schedule, random generator and the data."""

    config: Config
    model: torch.nn.Module
    train_model: torch.nn.Module  # what a train step calls: `model`, or DDP around it
    group: Group  # this process's rank among the run's processes
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    # Epoch orders and rotation angles, drawn on the CPU whatever the device, so that a run
    # draws the same ones everywhere; dropout uses torch's global generator of the device.
    generator: torch.Generator
    device: torch.device
    steps_per_epoch: int
    ema: torch.optim.swa_utils.AveragedModel | None  # the recipe's moving average, if any
    train_data: tuple[torch.Tensor, torch.Tensor]  # uint8 images, int64 labels
    eval_data: tuple[torch.Tensor, torch.Tensor]  # the test set, or the validation split

    def plan(self) -> torch.Tensor:
        """The next epoch's example order, drawn from the run's generator (once per epoch)."""
        return torch.randperm(len(self.train_data[0]), generator=self.generator).to(self.device)

    def run_step(self, order: torch.Tensor, step: int) -> torch.Tensor:
        """Step `step` of an epoch with example `order`; its loss (a tensor, not synced), on
        this rank's rows of the batch."""
        self.train_model.train()
        batch = order[step * self.config.batch_size:(step + 1) * self.config.batch_size]
        batch = batch[self.group.rows(len(batch))]
        images, labels = self.train_data
        loss = train_step(self.train_model, self.optimizer, self.scheduler, images[batch],
                          labels[batch], self.config, self.generator,
                          (self.group.rank, self.group.world_size))
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return loss

    @property
    def scored_model(self) -> torch.nn.Module:
        """The model that is scored and saved: the moving average where the recipe keeps one."""
        return self.ema.module if self.ema is not None else self.model

    def score(self) -> tuple[float, int]:
        """Mean loss and number of correct predictions on `eval_data` (each rank scores its
        share; a collective in a multi-process run)."""
        images, labels = self.eval_data
        if self.group.world_size == 1:
            return evaluate(self.scored_model, images, labels, self.config.eval_batch_size)
        rows = self.group.rows(len(images))
        loss, correct = evaluate(self.scored_model, images[rows], labels[rows],
                                 self.config.eval_batch_size)
        loss_sum, correct = self.group.sum([loss * len(images[rows]), correct])
        return loss_sum / len(images), int(correct)


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device `device` ("auto": CUDA where torch sees a GPU, else the CPU) names."""
    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch sees no CUDA device here; use --device cpu")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def setup_training(config: Config, data: Mnist, device: str = "auto", group: Group = SINGLE
                   ) -> Setup:
    """Build `config`'s run on `device`, as rank `group.rank` of `group.world_size` processes
    (joined by `torch_ref.distributed.join_from_env`); seeds torch's global generators
    (dropout) and the run's own."""
    count = config.training_images(len(data.train_images))
    steps = config.steps_per_epoch(count)
    if steps == 0:
        raise ConfigError(f"--batch-size {config.batch_size} is larger than the {count} "
                          f"training images")
    if config.batch_size % group.world_size:
        raise ConfigError(f"--batch-size {config.batch_size} must divide evenly over the "
                          f"{group.world_size} processes")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    device = resolve_device(device)
    model = create_model(config.model, config.dropout, config.widths).to(device)
    train_model = distribute(model, group, device)
    if group.rank:  # the same initial weights everywhere, but each rank its own dropout masks
        torch.manual_seed(config.seed + 7919 * group.rank)
    optimizer, scheduler = create_optimizer(model, config, config.epochs * steps)

    def on_device(images, labels):
        return torch.from_numpy(images).to(device), torch.from_numpy(labels).long().to(device)

    return Setup(
        config=config, model=model, train_model=train_model, group=group, optimizer=optimizer,
        scheduler=scheduler, generator=generator, device=device, steps_per_epoch=steps,
        ema=create_ema(model, config.ema_decay) if config.ema_decay else None,
        train_data=on_device(data.train_images[:count], data.train_labels[:count]),
        eval_data=on_device(*config.evaluation_set(data)))
