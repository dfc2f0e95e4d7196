"""Numerical parity of the Flax port and the torch reference: `python -m compare.parity`.

Prints one row per check (check, error, tolerance, pass) and exits 1 if any fails. The same
checks run as tests (tests/test_parity.py). All on real MNIST, float32 unless said, on the CPU
or, with `--device cuda` (the default where torch sees a GPU), torch on CUDA and JAX on its
default device, with TF32 off in both (float32 matrix products in full precision):

1. eval-mode outputs with weights converted torch->Flax and Flax->torch (the model table's
   networks and the seed README's SeedNet);
2. train-mode outputs (batch statistics), BatchNorm running statistics after one step and the
   gradients of the loss for every parameter: in float64 from the same inputs, to float64's own
   rounding (the same maths); in float32, within twice torch's own float32 error (at least 1e-3);
3. 100 optimizer steps of each framework's own train step from the same weights on the same
   batches (no augmentation or dropout), in float64: apart only by the rounding of the inputs,
   which Flax's step normalises in float32; the float32 drift; the loss with and without label
   smoothing;
4. the learning-rate schedule at every step of a full default run;
5. the rotation augmentation for the same angles;
6. a model trained in one framework scores the same test accuracy in the other;
   `--torch-model PATH` checks only this, for a saved torch model.pt (a full run's);
7. the NNX port (`flax_impl/nnx_model.py`, `nnx_train.py`), its weights converted from linen's:
   eval and train-mode outputs, BatchNorm statistics, gradients and a few dozen training steps
   of its own train step equal to linen's; and checks 1 to 3 against torch with the NNX network
   and train step in place of linen's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import itertools
import pickle
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx

from compare.convert import (
    ConversionError,
    flax_to_torch,
    linen_model,
    linen_to_nnx,
    nnx_module,
    nnx_to_linen,
    nnx_to_torch,
    torch_model,
    torch_to_flax,
    torch_to_nnx,
)
from flax_impl import core as flax_core
from flax_impl import nnx_train
from flax_impl.augment import rotate as flax_rotate
from flax_impl.common.config import Config, OneLineParser
from flax_impl.common.data import Mnist, load_mnist
from flax_impl.common.errors import ConfigError, DataError
from flax_impl.common.models import MODELS, conv_layers
from flax_impl.extras import fast
from flax_impl.extras.distributed import check_backend
from flax_impl.model import to_inputs as flax_to_inputs
from torch_ref import core as torch_core
from torch_ref.augment import rotate as torch_rotate
from torch_ref.model import to_inputs as torch_to_inputs
from torch_ref.train import DEVICES, resolve_device

BATCH = 128
CPU = torch.device("cpu")
# Outputs (log-probabilities) of the same weights through two frameworks' float32 kernels, which
# sum in other orders: each layer's sums of up to a few hundred products round by about 1e-7
# relative, through the network's seven layers; log-probabilities of trained networks reach
# tens. About 5e-7 on the CPUs (AVX-512 and AVX2) and 1e-6 on GPUs with TF32 off: 1e-5 bounds
# them, and a wrong layer (a transposed kernel, a biased variance) shows at 1e-2 or more.
EVAL_TOLERANCE = 1e-5
NO_NOISE = Config(max_rotation=0.0, dropout=0.0)  # the recipe without randomness
# What float64 proves, each about ten times what it agrees to on the CPU (`python -m
# compare.parity` prints the errors): one gradient from the same inputs, float64's own rounding
# (1e-12); 100 train steps of each framework's own step, the float32 rounding of the inputs in
# Flax's step (6e-8 per pixel), grown over the steps to 5e-8 in the loss, 3e-7 in the weights.
FLOAT64_GRADIENTS = 1e-10
FLOAT64_STEPS_LOSS = 5e-7
FLOAT64_STEPS_WEIGHTS = 3e-6


@dataclasses.dataclass
class Check:
    """One parity check's outcome."""

    name: str
    error: float
    tolerance: float
    detail: str = ""

    @property
    def passed(self) -> bool:
        return bool(self.error <= self.tolerance)


def torch_inputs(images: np.ndarray, device: torch.device = CPU) -> torch.Tensor:
    """torch's model input of uint8 numpy images, on `device`."""
    return torch_to_inputs(torch.from_numpy(images).to(device))


def flax_inputs(images: np.ndarray) -> jax.Array:
    """Flax's model input of uint8 numpy images."""
    return flax_to_inputs(jnp.asarray(images))


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def warmed_torch_model(name: str, data: Mnist, device: torch.device = CPU, seed: int = 0,
                       batch: int = BATCH) -> torch.nn.Module:
    """A torch model with random weights and non-trivial BatchNorm running statistics (three
    train-mode passes of `batch` images)."""
    torch.manual_seed(seed)
    model = torch_model(name).to(device)
    model.train()
    with torch.no_grad():
        for start in range(0, 3 * batch, batch):
            model(torch_inputs(data.train_images[start:start + batch], device))
    return model.eval()


@nnx.jit
def nnx_apply(module: nnx.Module, inputs: jax.Array) -> jax.Array:
    """The NNX module's outputs of `inputs`, in the mode it is in (jitted: NNX run eagerly
    dispatches, and compiles, operation by operation)."""
    return module(inputs)


def flax_eval(name: str, variables: dict, images: np.ndarray) -> np.ndarray:
    """The linen network `name`'s eval outputs of uint8 `images` with `variables`."""
    return np.asarray(jax.jit(linen_model(name).apply)(variables, flax_inputs(images)))


def check_eval_outputs(data: Mnist, name: str, tolerance: float, device: torch.device = CPU,
                       batch: int = BATCH) -> list[Check]:
    """1. Eval outputs of `batch` test images agree after converting weights in both
    directions."""
    images = data.test_images[:batch]
    torch_net = warmed_torch_model(name, data, device, batch=batch)
    with torch.no_grad():
        expected = torch_net(torch_inputs(images, device)).cpu().numpy()
    to_flax = max_abs(flax_eval(name, torch_to_flax(torch_net.state_dict(), name), images),
                      expected)

    variables = jax.jit(linen_model(name).init)(jax.random.key(1), flax_inputs(images[:1]))
    back = torch_model(name).to(device).eval()
    back.load_state_dict(flax_to_torch(variables, name))
    with torch.no_grad():
        to_torch = max_abs(back(torch_inputs(images, device)).cpu().numpy(),
                           flax_eval(name, variables, images))
    return [Check(f"eval output {name}, torch->flax", to_flax, tolerance),
            Check(f"eval output {name}, flax->torch", to_torch, tolerance)]


def train_mode_pass(data: Mnist, dtype=np.float32, device: torch.device = CPU,
                    name: str = "net", api: str = "linen"):
    """One train-mode forward and backward of model `name` in both frameworks (Flax in `api`)
    from the same weights.

    Returns (torch output, Flax output, torch state_dict after the step, Flax's as a state_dict,
    torch gradients, Flax gradients as torch-named arrays), computed in `dtype`.
    """
    images = data.train_images[:BATCH]
    labels = data.train_labels[:BATCH].astype(np.int64)
    torch_net = warmed_torch_model(name, data, device).train()
    variables = torch_to_flax(torch_net.state_dict(), name)
    torch_net = torch_net.to(torch.float64 if dtype == np.float64 else torch.float32)
    # One input array for both (the normalised pixels, float32 as the models take them, then in
    # `dtype`): each framework's own normalisation may round a pixel differently by one float32
    # ulp, which would bound a float64 comparison at float32's precision.
    inputs = torch_inputs(images, device)
    log_probs = torch_net(inputs.to(next(torch_net.parameters()).dtype))
    F.nll_loss(log_probs, torch.from_numpy(labels).to(device)).backward()
    torch_grads = {k: p.grad.cpu().numpy() for k, p in torch_net.named_parameters()}

    with jax.enable_x64(dtype == np.float64):
        variables = jax.tree.map(lambda x: jnp.asarray(x, dtype), variables)
        inputs = jnp.asarray(inputs.cpu().numpy().transpose(0, 2, 3, 1), dtype)  # NCHW -> NHWC
        targets = jnp.asarray(labels)
        if api == "nnx":
            grads, flax_out, stats = nnx_train_pass(linen_to_nnx(variables, name), inputs,
                                                    targets, name)
        else:
            grads, flax_out, stats = linen_train_pass(linen_model(name), variables, inputs,
                                                      targets)
        grads, flax_out, stats = jax.tree.map(np.asarray, (grads, flax_out, stats))
    # One torch-named dict holds both: the gradients (as weights) and the new running statistics.
    as_torch = flax_to_torch({"params": grads, "batch_stats": stats}, name)
    torch_state = {k: v.cpu() for k, v in torch_net.state_dict().items()}
    return log_probs.detach().cpu().numpy(), flax_out, torch_state, as_torch, torch_grads, as_torch


def linen_train_pass(model, variables: dict, inputs, labels):
    """(gradients of the NLL loss, train-mode output, new BatchNorm statistics) of linen."""

    def loss_fn(params):
        out, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                   inputs, train=True, mutable=["batch_stats"])
        return flax_core.nll_loss(out, labels), (out, updates["batch_stats"])

    grads, (out, stats) = jax.jit(jax.grad(loss_fn, has_aux=True))(variables["params"])
    return grads, out, stats


def nnx_train_pass(module: nnx.Module, inputs, labels, name: str = "net"):
    """(gradients of the NLL loss, train-mode output, new BatchNorm statistics) of an NNX
    module, as NNX trains it (`nnx.value_and_grad`; the statistics updated in place), in linen's
    naming."""

    @nnx.jit
    def grad_pass(module):
        def loss_fn(module):
            out = module(inputs)
            return flax_core.nll_loss(out, labels), out

        (_, out), grads = nnx.value_and_grad(loss_fn, has_aux=True)(module)
        return grads, out

    module.train()
    grads, out = grad_pass(module)
    return nnx.to_pure_dict(grads), out, nnx_to_linen(module, name)["batch_stats"]


def vanishing_gradients(name: str) -> set[str]:
    """The torch names of model `name`'s parameters whose gradient is 0 in exact arithmetic: the
    BatchNorm scale of a block whose every channel feeds one channel of a depthwise block (max-
    pools and ReLUs between keep its scale), whose BatchNorm undoes any scale. Computed, each
    framework gets rounding noise there, whose relative difference means nothing."""
    if name not in MODELS:
        return set()
    spec = MODELS[name]
    blocks = [layer for layer in conv_layers(spec.layout, spec.widths) if layer != "M"]
    return {f"{block.name}.bn.weight" for block, after in itertools.pairwise(blocks)
            if after.groups > 1 and after.normalized and block.normalized}


def worst_relative_gradient_error(torch_grads: dict, flax_grads: dict,
                                  skip: set[str] = frozenset()) -> tuple[str, float]:
    """The parameter whose gradients differ most, as ||flax - torch|| / ||torch||, but for the
    parameters named in `skip`."""
    def norm(x):
        return float(np.linalg.norm(np.asarray(x, np.float64)))

    errors = {k: norm(np.asarray(flax_grads[k], np.float64) - g) / max(norm(g), 1e-30)
              for k, g in torch_grads.items() if k not in skip}
    worst = max(errors, key=errors.get)
    return worst, errors[worst]


def check_train_mode(data: Mnist, device: torch.device = CPU, name: str = "net",
                     api: str = "linen") -> list[Check]:
    """2. Train-mode outputs, running statistics after the step, gradients (model `name`, Flax
    in `api`)."""
    torch_out, flax_out, torch_state, flax_state, torch_grads, flax_grads = train_mode_pass(
        data, np.float32, device, name, api)
    stats = max(max_abs(torch_state[k], flax_state[k]) for k in torch_state
                if k.endswith(("running_mean", "running_var")))
    noise = vanishing_gradients(name)
    worst32, error32 = worst_relative_gradient_error(torch_grads, flax_grads, noise)
    *_, torch_grads64, flax_grads64 = train_mode_pass(data, np.float64, device, name, api)
    worst64, error64 = worst_relative_gradient_error(torch_grads64, flax_grads64, noise)
    torch_own = worst_relative_gradient_error(torch_grads64, torch_grads, noise)[1]
    name = f"{name} (NNX)" if api == "nnx" else name
    return [Check(f"{name}: train-mode output (batch statistics)", max_abs(torch_out, flax_out),
                  EVAL_TOLERANCE),
            # Means and variances of 128 x 26 x 26 values or fewer, summed in other orders.
            Check(f"{name}: BatchNorm running mean/var after a step", stats, 1e-5,
                  "torch keeps the unbiased variance; so does our Flax BatchNorm"),
            # From one input array, float64 leaves only its own rounding (about 1e-12 here,
            # sums over 128 x 26 x 26 terms); one float32 operation or another formula anywhere
            # would show at 1e-8 or more.
            Check(f"{name}: gradients, every parameter, float64 (relative)", error64,
                  FLOAT64_GRADIENTS, f"worst: {worst64}; float64 from the same inputs: the same "
                  f"maths to float64's rounding" + (f"; {len(noise)} BatchNorm scales whose "
                                                    f"gradient vanishes left out" if noise else "")),
            # float32's own rounding sets the bar: narrow layers (TinyNet's) round more.
            Check(f"{name}: gradients, every parameter, float32 (relative)", error32,
                  max(1e-3, 2 * torch_own),
                  f"worst: {worst32}; float32 rounding: torch's own float32 gradients are "
                  f"{torch_own:.1e} from float64")]


def flax_train_step(config: Config, variables: dict, steps: int, api: str = "linen"):
    """(jitted train step, initial state, state -> its linen-style numpy variables) of Flax's own
    training of `config` in `api`, from linen-style `variables`, for a run of `steps` steps."""
    tx = flax_core.create_optimizer(config, steps)
    if api == "nnx":
        module = linen_to_nnx(variables, config.model, dropout=config.dropout)
        graphdef, state = nnx.split((module, nnx.Optimizer(module, tx, wrt=nnx.Param)))
        return (jax.jit(nnx_train.functional_step(graphdef, config)), state,
                lambda state: nnx_to_linen(nnx.merge(graphdef, state)[0], config.model))
    state = flax_core.TrainState.create(apply_fn=linen_model(config.model).apply,
                                        params=variables["params"], tx=tx,
                                        batch_stats=variables["batch_stats"])
    return (jax.jit(functools.partial(flax_core.train_step, config=config)), state,
            lambda state: jax.tree.map(np.asarray, flax_core.variables_of(state)))


def optimizer_steps(data: Mnist, steps: int, dtype, device: torch.device = CPU,
                    recipe: Config = NO_NOISE, model: str = "net", batch: int = BATCH,
                    api: str = "linen") -> tuple[float, float]:
    """`steps` SGD steps of each framework's own train step of `model` from the same weights on
    the same batches of `batch` images, in `dtype`, with `recipe`'s loss (rotation and dropout
    off), Flax's network and step in `api`: (largest loss gap, largest relative gap of the
    weights and statistics at the end)."""
    config = dataclasses.replace(recipe, max_rotation=0.0, dropout=0.0, epochs=1, model=model,
                                 batch_size=batch, train_examples=steps * batch, api=api)
    torch_net = warmed_torch_model(model, data, device).train()
    variables = torch_to_flax(torch_net.state_dict(), model)
    torch_net = torch_net.to(torch.float64 if dtype == np.float64 else torch.float32)
    optimizer, scheduler = torch_core.create_optimizer(torch_net, config, steps)
    generator = torch.Generator()
    loss_gap = 0.0
    with jax.enable_x64(dtype == np.float64):
        step, state, variables_of = flax_train_step(
            config, jax.tree.map(lambda x: jnp.asarray(x, dtype), variables), steps, api)
        for i in range(steps):
            images = data.train_images[i * batch:(i + 1) * batch]
            labels = data.train_labels[i * batch:(i + 1) * batch]
            torch_loss = torch_core.train_step(torch_net, optimizer, scheduler,
                                               torch.from_numpy(images).to(device),
                                               torch.from_numpy(labels).long().to(device), config,
                                               generator)
            state, metrics = step(state, (jnp.asarray(images), jnp.asarray(labels)),
                                  jax.random.key(i))
            loss_gap = max(loss_gap, abs(float(metrics["loss"]) - torch_loss.item()))
        trained = variables_of(state)
    converted = flax_to_torch(trained, model)
    gap = max(max_abs(converted[k], p.detach().cpu()) / max(float(p.abs().max()), 1e-12)
              for k, p in torch_net.state_dict().items() if p.is_floating_point())
    return loss_gap, gap


def check_optimizer_steps(data: Mnist, steps: int = 100, float32_drift: bool = True,
                          device: torch.device = CPU, model: str = "net", batch: int = BATCH,
                          api: str = "linen") -> list[Check]:
    """3. `steps` optimizer steps of `model` at `batch` images in float64, each framework's own
    train step: the same maths, up to the rounding of the inputs (Flax's step normalises the
    pixels in float32 whatever the weights' precision, torch's in the weights' float64), about
    6e-8 relative, grown over the steps; optionally the float32 drift.

    Where two inputs of a max-pool window lie within that rounding of each other, the frameworks
    can route that gradient to different pixels, and the runs part by about 1e-5 from that step
    on (TinyNet, 20 steps of 32 images, does so at its 8th step): the runs checked here (and in
    tests/test_parity.py) have no such tie; a new one that fails by about 1e-5 may have one."""
    loss64, params64 = optimizer_steps(data, steps, np.float64, device, NO_NOISE, model, batch,
                                       api)
    what = (f"{steps} SGD steps" + (f", {model}" if model != "net" else "")
            + (" (NNX)" if api == "nnx" else ""))
    why = "float64; the inputs' float32 rounding (Flax's step) is all that differs"
    checks = [Check(f"{what}, float64: loss, max |difference|", loss64, FLOAT64_STEPS_LOSS, why),
              Check(f"{what}, float64: weights and stats (relative)", params64,
                    FLOAT64_STEPS_WEIGHTS, why)]
    if float32_drift:
        loss32, params32 = optimizer_steps(data, steps, np.float32, device, model=model,
                                           batch=batch)
        drift = (f"float32 rounding differences grow chaotically at the peak rate: after "
                 f"{steps} steps the weights differ by {params32:.2g} (relative)")
        checks.append(Check(f"{steps} SGD steps, float32: loss, max |difference|", loss32, 0.1,
                            drift))
    return checks


def check_loss(data: Mnist, label_smoothing: float = 0.1) -> list[Check]:
    """3b. The loss of log_softmax(logits) and its gradient with respect to the logits (the
    model's last layer, whose outputs then pass through its log-softmax), float64, with and
    without label smoothing; logits: a model's on real digits."""
    with torch.no_grad():
        logits = warmed_torch_model("net", data)(torch_inputs(data.test_images[:BATCH])).double()
    labels = data.test_labels[:BATCH].astype(np.int64)

    def flax_loss(z, smoothing):
        return flax_core.nll_loss(jax.nn.log_softmax(z), jnp.asarray(labels), smoothing)

    checks = []
    for smoothing in (0.0, label_smoothing):
        torch_logits = logits.clone().requires_grad_()
        torch_loss = torch_core.nll_loss(F.log_softmax(torch_logits, dim=1),
                                         torch.from_numpy(labels), smoothing)
        torch_loss.backward()
        with jax.enable_x64(True):
            loss, grad = jax.value_and_grad(flax_loss)(jnp.asarray(logits.numpy()), smoothing)
            loss, grad = float(loss), np.asarray(grad)
        error = max(abs(loss - torch_loss.item()), max_abs(grad, torch_logits.grad))
        checks.append(Check(f"loss and its gradient, label smoothing {smoothing:g}", error, 1e-12,
                            "torch: nll_loss" if not smoothing else
                            "torch: cross_entropy(label_smoothing=...)"))
    return checks


def check_schedule(num_train: int = 60_000) -> list[Check]:
    """4. The learning rate at every step of a full default run."""
    config = Config()
    total = config.epochs * config.steps_per_epoch(num_train)
    optimizer, scheduler = torch_core.create_optimizer(torch.nn.Linear(1, 1), config, total)
    torch_lrs = []
    for _ in range(total):
        torch_lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    flax_lrs = np.asarray(jax.jit(jax.vmap(flax_core.onecycle_schedule(config, total)))(
        jnp.arange(total)))
    relative = np.max(np.abs(flax_lrs - np.array(torch_lrs)) / np.array(torch_lrs))
    # A cosine of a float32 step fraction in Optax against float64 in torch: a few 1e-7.
    return [Check(f"learning rate, all {total} steps (relative)", float(relative), 1e-5,
                  "float32 (Optax) vs float64 (torch)")]


def check_rotation(data: Mnist) -> list[Check]:
    """5. The same angles rotate the same images identically."""
    images = data.train_images[:BATCH].astype(np.float32) / 255.0
    max_degrees = Config().max_rotation
    angles = np.random.default_rng(0).uniform(-max_degrees, max_degrees, BATCH).astype(np.float32)
    by_torch = torch_rotate(torch.from_numpy(images)[:, None], torch.from_numpy(angles))
    images, angles = jnp.asarray(images)[..., None], jnp.asarray(angles)
    by_gather = flax_rotate(images, angles)
    by_shifts = fast.rotate(images, angles, max_degrees)
    return [Check("rotation, same angles (stock: gather)",
                  max_abs(by_torch[:, 0], by_gather[..., 0]), 1e-5),
            Check("rotation, same angles (fast: shifted copies)",
                  max_abs(by_torch[:, 0], by_shifts[..., 0]), 1e-5)]


def torch_test_scores(model: torch.nn.Module, data: Mnist) -> np.ndarray:
    """A torch model's log-probabilities of every test image (on the model's device)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        return np.concatenate([model.eval()(torch_inputs(data.test_images[i:i + 1000], device))
                               .cpu().numpy() for i in range(0, len(data.test_images), 1000)])


def flax_test_scores(variables: dict, data: Mnist) -> np.ndarray:
    """Linen `Net` `variables`' log-probabilities of every test image."""
    return np.concatenate([flax_eval("net", variables, data.test_images[i:i + 1000])
                           for i in range(0, len(data.test_images), 1000)])


def differing_beyond_ties(scores: np.ndarray, other: np.ndarray, tolerance: float) -> int:
    """How many images the two frameworks' scores of the same weights classify differently,
    not counting near-ties: each output may differ by `tolerance` (check 1), so an image whose
    two top classes lie within 2 x `tolerance` may go either way on any CPU or GPU."""
    picked, other_picked = scores.argmax(-1), other.argmax(-1)
    rows = np.arange(len(scores))
    margin = scores[rows, picked] - scores[rows, other_picked]  # 0 where both agree
    return int(np.sum(margin > 2 * tolerance))


class ParityInputError(Exception):
    """A file given to a parity check cannot be used."""


def check_trained_models(data: Mnist, steps: int = 150, device: torch.device = CPU
                         ) -> list[Check]:
    """6. Train briefly in each framework (each its own train step, the same first batches);
    the converted model scores the same in the other."""
    config = dataclasses.replace(NO_NOISE, epochs=1, train_examples=steps * BATCH)
    torch.manual_seed(config.seed)
    torch_net = torch_model("net").to(device).train()
    optimizer, scheduler = torch_core.create_optimizer(torch_net, config, steps)
    generator = torch.Generator().manual_seed(config.seed)
    model = linen_model("net")
    variables = jax.jit(model.init)(jax.random.key(config.seed), flax_inputs(data.test_images[:1]))
    step, state, variables_of = flax_train_step(config, variables, steps)
    for i in range(steps):
        images = data.train_images[i * BATCH:(i + 1) * BATCH]
        labels = data.train_labels[i * BATCH:(i + 1) * BATCH]
        torch_core.train_step(torch_net, optimizer, scheduler, torch.from_numpy(images).to(device),
                              torch.from_numpy(labels).long().to(device), config, generator)
        state, _ = step(state, (jnp.asarray(images), jnp.asarray(labels)), jax.random.key(i))
    torch_scores = torch_test_scores(torch_net, data)
    in_flax = flax_test_scores(torch_to_flax(torch_net.state_dict()), data)
    flax_scores = flax_test_scores(variables_of(state), data)
    back = torch_model("net").to(device)
    back.load_state_dict(flax_to_torch(variables_of(state)))
    in_torch = torch_test_scores(back, data)
    return [Check("torch-trained, test predictions in Flax (images differing beyond a tie)",
                  differing_beyond_ties(torch_scores, in_flax, EVAL_TOLERANCE), 0,
                  f"{accuracy_pair(torch_scores, in_flax, data)} correct of "
                  f"{len(data.test_images)}"),
            Check("Flax-trained, test predictions in torch (images differing beyond a tie)",
                  differing_beyond_ties(flax_scores, in_torch, EVAL_TOLERANCE), 0,
                  f"{accuracy_pair(flax_scores, in_torch, data)} correct of "
                  f"{len(data.test_images)}")]


def accuracy_pair(scores: np.ndarray, other: np.ndarray, data: Mnist) -> str:
    """'N vs M': the correct test predictions of two scores of the test images."""
    return " vs ".join(str(int(np.sum(s.argmax(-1) == data.test_labels))) for s in (scores, other))


def load_torch_net(path: str) -> dict:
    """The state_dict of a saved torch `Net` (ParityInputError naming what is wrong with the
    file), checked against the network before anything else loads."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        torch_model("net").load_state_dict(state_dict)
        torch_to_flax(state_dict)
    except (OSError, EOFError, RuntimeError, ConversionError, pickle.UnpicklingError,
            AttributeError, TypeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else "an empty or " \
            "truncated file"
        raise ParityInputError(f"cannot use {path} as a torch Net state_dict "
                               f"({type(error).__name__}: {reason}); "
                               f"pass the model.pt of a torch_ref.train workdir") from None
    return state_dict


def check_saved_torch_model(data: Mnist, path: str, device: torch.device = CPU) -> list[Check]:
    """6b. A torch `model.pt` (e.g. a full default run's), converted, scores the same in Flax."""
    state_dict = load_torch_net(path)
    torch_net = torch_model("net").to(device)
    torch_net.load_state_dict(state_dict)
    torch_scores = torch_test_scores(torch_net, data)
    in_flax = flax_test_scores(torch_to_flax(state_dict), data)
    return [Check("saved torch model, test predictions in Flax (images differing beyond a tie)",
                  differing_beyond_ties(torch_scores, in_flax, EVAL_TOLERANCE), 0,
                  f"{path}: {accuracy_pair(torch_scores, in_flax, data)} correct of "
                  f"{len(data.test_images)}")]


def check_nnx_against_linen(data: Mnist, name: str = "net", steps: int = 30) -> list[Check]:
    """7a. NNX against linen, model `name`, the NNX module holding linen's weights (converted):
    eval and train-mode outputs, BatchNorm statistics, gradients (dropout off), and `steps` of
    each API's own train step on the same batches, float32."""
    images = data.train_images[:BATCH]
    inputs, labels = flax_inputs(images), jnp.asarray(data.train_labels[:BATCH])
    variables = jax.jit(linen_model(name).init)(jax.random.key(1), inputs[:1])
    module = linen_to_nnx(variables, name)
    linen_grads, linen_out, linen_stats = linen_train_pass(linen_model(name), variables, inputs,
                                                           labels)
    module.eval()
    nnx_eval = np.asarray(nnx_apply(module, inputs))
    nnx_grads, nnx_out, nnx_stats = nnx_train_pass(module, inputs, labels, name)
    flat = lambda tree: dict(zip(map(str, range(len(jax.tree.leaves(tree)))),  # noqa: E731
                                 map(np.asarray, jax.tree.leaves(tree)), strict=True))
    # The same operations traced through two APIs; XLA may fuse (and so round) them otherwise:
    # float32's rounding, 0 to 1e-8 measured on the CPUs, over 30 steps too.
    checks = [Check(f"{name} (NNX): eval output = linen's", max_abs(nnx_eval,
                    flax_eval(name, variables, images)), 1e-5),
              Check(f"{name} (NNX): train-mode output = linen's", max_abs(nnx_out, linen_out),
                    1e-5),
              Check(f"{name} (NNX): BatchNorm running mean/var after a step = linen's",
                    max(max_abs(a, b) for a, b in zip(jax.tree.leaves(nnx_stats),
                                                      jax.tree.leaves(linen_stats), strict=True)),
                    1e-5),
              Check(f"{name} (NNX): gradients = linen's (relative)",
                    worst_relative_gradient_error(flat(linen_grads), flat(nnx_grads))[1], 1e-5)]
    config = dataclasses.replace(NO_NOISE, model=name, epochs=1, train_examples=steps * BATCH)
    trained = []
    for api in ("linen", "nnx"):
        step, state, variables_of = flax_train_step(config, variables, steps, api)
        for i in range(steps):
            batch = (jnp.asarray(data.train_images[i * BATCH:(i + 1) * BATCH]),
                     jnp.asarray(data.train_labels[i * BATCH:(i + 1) * BATCH]))
            state, _ = step(state, batch, jax.random.key(i))
        trained.append(variables_of(state))
    gap = max(max_abs(a, b) / max(float(np.abs(a).max()), 1e-12)
              for a, b in zip(*map(jax.tree.leaves, trained), strict=True))
    checks.append(Check(f"{name} (NNX): {steps} train steps, float32, = linen's (relative)", gap,
                        1e-5, "nnx.Optimizer and the NNX step against TrainState and linen's"))
    return checks


def check_nnx_eval_outputs(data: Mnist, name: str, tolerance: float,
                           device: torch.device = CPU) -> list[Check]:
    """7b. The NNX module's own eval outputs with weights converted torch->NNX and NNX->torch."""
    images = data.test_images[:BATCH]
    torch_net = warmed_torch_model(name, data, device)
    with torch.no_grad():
        expected = torch_net(torch_inputs(images, device)).cpu().numpy()
    module = torch_to_nnx(torch_net.state_dict(), name)
    module.eval()
    to_nnx = max_abs(np.asarray(nnx_apply(module, flax_inputs(images))), expected)
    module = nnx_module(name, rngs=nnx.Rngs(1))
    module.eval()
    back = torch_model(name).to(device).eval()
    back.load_state_dict(nnx_to_torch(module, name))
    with torch.no_grad():
        to_torch = max_abs(back(torch_inputs(images, device)).cpu().numpy(),
                           np.asarray(nnx_apply(module, flax_inputs(images))))
    return [Check(f"eval output {name}, torch->NNX", to_nnx, tolerance),
            Check(f"eval output {name}, NNX->torch", to_torch, tolerance)]


def check_nnx(data: Mnist, device: torch.device = CPU) -> list[Check]:
    """7. The NNX port against linen and against torch (checks 1 to 3 with the NNX network)."""
    return (check_nnx_against_linen(data, "net") + check_nnx_against_linen(data, "tinynet")
            + check_nnx_against_linen(data, "sepnet") + check_nnx_against_linen(data, "xsepnet")
            + check_nnx_eval_outputs(data, "net", EVAL_TOLERANCE, device)
            + check_nnx_eval_outputs(data, "sepnet", EVAL_TOLERANCE, device)
            + check_nnx_eval_outputs(data, "xsepnet", EVAL_TOLERANCE, device)
            + check_nnx_eval_outputs(data, "seednet", 1e-4, device)
            + check_train_mode(data, device, "net", "nnx")
            + check_optimizer_steps(data, float32_drift=False, device=device, api="nnx"))


def all_checks(data: Mnist, device: torch.device = CPU) -> list[Callable[[], list[Check]]]:
    """The seven checks of the module docstring, in order, as thunks; torch on `device`."""
    return [lambda: (check_eval_outputs(data, "net", EVAL_TOLERANCE, device)
                     + check_eval_outputs(data, "tinynet", EVAL_TOLERANCE, device)
                     + check_eval_outputs(data, "widenet", EVAL_TOLERANCE, device)
                     + check_eval_outputs(data, "sepnet", EVAL_TOLERANCE, device)
                     + check_eval_outputs(data, "xsepnet", EVAL_TOLERANCE, device)
                     + check_eval_outputs(data, "seednet", 1e-4, device)),
            lambda: (check_train_mode(data, device) + check_train_mode(data, device, "tinynet")
                     + check_train_mode(data, device, "sepnet")
                     + check_train_mode(data, device, "xsepnet")),
            lambda: (check_optimizer_steps(data, device=device)
                     + check_optimizer_steps(data, 5, False, device, model="sepnet", batch=32)
                     + check_loss(data)),
            lambda: check_schedule(len(data.train_images)),
            lambda: check_rotation(data),
            lambda: check_trained_models(data, device=device),
            lambda: check_nnx(data, device)]


def format_rows(checks: list[Check]) -> str:
    """The results as an aligned table."""
    rows = [("check", "error", "tolerance", "pass", "")]
    rows += [(c.name, f"{c.error:.3g}", f"{c.tolerance:.0e}" if c.tolerance else "0",
              "PASS" if c.passed else "FAIL", c.detail) for c in checks]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


@contextlib.contextmanager
def full_float32_precision():
    """Within: float32 matrix products and convolutions in full float32 in both frameworks.

    GPUs since Ampere default to TF32 (10-bit mantissa) in both, which breaks 1e-5 parity; on
    the CPU this changes nothing.
    """
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with jax.default_matmul_precision("highest"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = OneLineParser(prog="python -m compare.parity", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-source", default="auto")
    parser.add_argument("--torch-model", metavar="PATH",
                        help="only check this trained torch model.pt, converted to Flax")
    parser.add_argument("--device", default="auto", choices=DEVICES,
                        help="torch's device (auto: CUDA where torch sees a GPU)")
    parser.add_argument("--checks", default="1,2,3,4,5,6,7",
                        help="which of the numbered checks to run, e.g. 4,5")
    args = parser.parse_args(argv)
    try:
        chosen = sorted({int(n) for n in args.checks.split(",")})
        if not all(1 <= n <= 7 for n in chosen):
            raise ValueError
    except ValueError:
        parser.error(f"--checks takes numbers from 1 to 7 separated by commas, got "
                     f"{args.checks!r}")
    torch.manual_seed(0)
    try:
        check_backend()
        device = resolve_device(args.device)
        if args.torch_model:  # a file that is no torch Net is said before the data loads
            load_torch_net(args.torch_model)
        data = load_mnist(args.data_source)
        with full_float32_precision():
            if args.torch_model:
                checks = check_saved_torch_model(data, args.torch_model, device)
            else:
                runs = all_checks(data, device)
                checks = [check for n in chosen for check in runs[n - 1]()]
    except (ParityInputError, ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"torch on {device}, jax on {jax.devices()[0].platform}")
    print(format_rows(checks))
    failed = [c.name for c in checks if not c.passed]
    print(f"{len(checks) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
