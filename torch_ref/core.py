"""The core of the PyTorch reference: optimizer and schedule, loss, train step, evaluation, the
epochs' batches.

Mirrors `flax_impl/core.py`, in torch's idiom: the model and the optimizer are updated in place.
`torch_ref.train` builds a run from these and runs its epochs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flax_impl.common.config import Config
from torch_ref.augment import random_rotate
from torch_ref.model import to_inputs


def create_optimizer(model: torch.nn.Module, config: Config, total_steps: int):
    """SGD (Nesterov, L2 weight decay on every parameter) and the one-cycle schedule."""
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                nesterov=True, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=total_steps, pct_start=config.warmup_fraction,
        anneal_strategy="cos", cycle_momentum=False, div_factor=config.div_factor,
        final_div_factor=config.final_div_factor)
    return optimizer, scheduler


def nll_loss(log_probs: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
             ) -> torch.Tensor:
    """Mean NLL of log-probabilities; with label smoothing, torch's own cross_entropy (its
    log_softmax leaves log-probabilities unchanged)."""
    if label_smoothing:
        return F.cross_entropy(log_probs, labels, label_smoothing=label_smoothing)
    return F.nll_loss(log_probs, labels)


def train_step(model, optimizer, scheduler, images, labels, config: Config,
               generator: torch.Generator, part: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """One step of SGD on a uint8 batch (`model` in training mode): rotate, normalise, forward,
    backward, update; the loss (a tensor, not synced).

    `part` (i, n): the batch is rank i's share of a global batch of n ranks (`random_rotate`).
    """
    model.train()
    inputs = to_inputs(images, lambda pixels: random_rotate(pixels, config.max_rotation,
                                                            generator, part),
                       dtype=next(model.parameters()).dtype)
    loss = nll_loss(model(inputs), labels, config.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.detach()


@torch.no_grad()
def evaluate(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int
             ) -> tuple[float, int]:
    """Mean NLL loss and number of correct predictions on a uint8 image set."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(images), batch_size):
        log_probs = model(to_inputs(images[start:start + batch_size]))
        target = labels[start:start + batch_size]
        loss_sum += F.nll_loss(log_probs, target, reduction="sum").item()
        correct += (log_probs.argmax(1) == target).sum().item()
    return loss_sum / len(images), correct


def epoch_plan(generator: torch.Generator, num_train: int, steps: int, batch_size: int
               ) -> torch.Tensor:
    """The batches' example indices (steps, B) of one epoch: a permutation of the `num_train`
    examples drawn from `generator` (once per epoch, so a resumed run restores the generator
    with the checkpoint), the last partial batch dropped."""
    order = torch.randperm(num_train, generator=generator)
    return order[:steps * batch_size].view(steps, batch_size)
