"""Train the PyTorch reference: `python -m torch_ref.train` (see --help).

The same recipe as `flax_impl.train` (flax_impl/config.py): SGD with Nesterov momentum and weight
decay, torch's OneCycleLR, random rotation, NLL loss on log-probabilities. Data stays in memory
as tensors; each epoch is a random permutation split into full batches.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from flax_impl.config import Config, ConfigError, build_parser, config_from_args
from flax_impl.data import DataError, load_mnist, normalize
from flax_impl.reporting import (
    WorkdirError,
    epoch_bar,
    prepare_workdir,
    summary_line,
    test_line,
    write_curves,
    write_metrics,
)
from torch_ref.augment import random_rotate
from torch_ref.model import create_model

CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"


def to_inputs(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 28, 28) -> normalised float32 (B, 1, 28, 28)."""
    return normalize(images_uint8.unsqueeze(1).float() / 255.0)


def create_optimizer(model: torch.nn.Module, config: Config, total_steps: int):
    """SGD (Nesterov, L2 weight decay on every parameter) and the one-cycle schedule."""
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                nesterov=True, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=total_steps, pct_start=config.warmup_fraction,
        anneal_strategy="cos", cycle_momentum=False, div_factor=config.div_factor,
        final_div_factor=config.final_div_factor)
    return optimizer, scheduler


def train_step(model, optimizer, scheduler, images, labels, config: Config,
               generator: torch.Generator) -> torch.Tensor:
    """One step on a uint8 batch: rotate, normalise, forward, backward, update. Returns the loss."""
    pixels = images.unsqueeze(1).to(next(model.parameters()).dtype) / 255.0
    inputs = normalize(random_rotate(pixels, config.max_rotation, generator))
    loss = F.nll_loss(model(inputs), labels)
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


def train(config: Config, workdir: Path | None = None, resume: bool = False,
          overwrite: bool = False) -> list[dict]:
    """Train `config`; print the seed-style log; return the per-epoch metrics."""
    history = prepare_workdir(workdir, config, "torch", resume, overwrite) if workdir else []
    data = load_mnist(config.data_source)
    count = config.train_examples or len(data.train_images)
    train_images = torch.from_numpy(data.train_images[:count])
    train_labels = torch.from_numpy(data.train_labels[:count]).long()
    test_images = torch.from_numpy(data.test_images)
    test_labels = torch.from_numpy(data.test_labels).long()
    steps = config.steps_per_epoch(len(train_images))
    if steps == 0:
        raise ConfigError(f"--batch-size {config.batch_size} is larger than the "
                          f"{len(train_images)} training images")

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = create_model(config.model, config.dropout)
    optimizer, scheduler = create_optimizer(model, config, config.epochs * steps)
    checkpoint = workdir / CHECKPOINT_FILE if workdir else None
    if checkpoint and not resume:  # a fresh run: no checkpoint of an earlier one may survive
        checkpoint.unlink(missing_ok=True)
    if resume and checkpoint and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])  # dropout draws from the global generator
        history = history[:state["epoch"]]
        print(f"Resumed from {checkpoint} after epoch {state['epoch']}")

    for epoch in range(len(history) + 1, config.epochs + 1):
        start = time.perf_counter()
        model.train()
        order = torch.randperm(len(train_images), generator=generator)
        loss_sum = torch.zeros(())
        with epoch_bar(epoch, config.epochs, steps) as bar:
            for step in range(steps):
                index = order[step * config.batch_size:(step + 1) * config.batch_size]
                loss = train_step(model, optimizer, scheduler, train_images[index],
                                  train_labels[index], config, generator)
                loss_sum += loss
                bar.update()
                if step % 20 == 0 or step == steps - 1:
                    bar.set_postfix_str(f"loss={loss_sum.item() / (step + 1):.4f}")
        test_loss, correct = evaluate(model, test_images, test_labels, config.eval_batch_size)
        print(test_line(test_loss, correct, len(test_images)), flush=True)
        history.append({"epoch": epoch, "train_loss": loss_sum.item() / steps,
                        "test_loss": test_loss, "test_accuracy": correct / len(test_images),
                        "seconds": time.perf_counter() - start})
        if workdir:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                        "torch_rng": torch.get_rng_state(), "epoch": epoch}, checkpoint)
            write_metrics(workdir, history)
            write_curves(workdir, history)
    if workdir:
        torch.save(model.state_dict(), workdir / MODEL_FILE)
    print(summary_line(history))
    return history


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = build_parser("python -m torch_ref.train", __doc__.splitlines()[0])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = config_from_args(args)
        train(config, args.workdir, args.resume, args.overwrite)
    except (ConfigError, DataError, WorkdirError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
