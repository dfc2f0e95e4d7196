"""The NNX port's training: `nnx.Optimizer`, an NNX train step, and its functional form.

`train_step(model, optimizer, batch, key)` is the step as NNX users write it: it updates the
modules in place (`nnx.value_and_grad`, `optimizer.update`). `flax_impl.train` runs it as Flax's
performance guide advises for small models: the modules' graph found once (`nnx.graphdef`),
their state carried through `jax.jit` and `lax.scan` and merged inside (`functional_step`); the
loop, the checkpoints and the evaluation are the linen port's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import optax
from flax import nnx

from flax_impl import nnx_model
from flax_impl.augment import rotate
from flax_impl.common.config import Config
from flax_impl.core import Port, nll_loss, train_inputs


def create_modules(config: Config, key: jax.Array, tx: optax.GradientTransformation,
                   conv_general_dilated: Callable = jax.lax.conv_general_dilated,
                   max_pool: Callable = nnx.max_pool) -> tuple[nnx.Module, nnx.Optimizer]:
    """(model, optimizer) of `config`: the network drawn from `key` (its ``params`` and
    ``dropout`` streams) and `nnx.Optimizer` over its parameters."""
    params_key, dropout_key = jax.random.split(key)
    model = nnx_model.create_model(config.model, config.dropout, config.widths,
                                   rngs=nnx.Rngs(params=params_key, dropout=dropout_key),
                                   conv_general_dilated=conv_general_dilated, max_pool=max_pool)
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch, key: jax.Array, *,
               config: Config, rotate_fn: Callable = rotate) -> dict:
    """One step of SGD on uint8 `batch` = (images, labels), in place; {"loss"}. Dropout draws
    from the model's own stream; `key` draws the rotations."""
    images, labels = batch
    inputs = train_inputs(config, images, key, rotate_fn)

    def loss_fn(model):
        return nll_loss(model(inputs), labels, config.label_smoothing)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return {"loss": loss}


def create_port(config: Config, tx: optax.GradientTransformation, kernels) -> Port:
    """The NNX port of `config`, with `kernels`' convolution, pooling and rotation: the modules'
    graph found once (`nnx.eval_shape`), their state the train state."""
    create = functools.partial(create_modules, config, tx=tx,
                               conv_general_dilated=kernels.conv_general_dilated,
                               max_pool=kernels.max_pool)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: create(jax.random.key(0))))
    return Port(init=lambda key: nnx.state(create(key)),
                train_step=functional_step(graphdef, config, kernels.rotate),
                log_probs=lambda state, inputs: eval_model(graphdef, state)(inputs),
                variables=lambda state: nnx_model.variables_of(eval_model(graphdef, state)))


def functional_step(graphdef: nnx.GraphDef, config: Config, rotate_fn: Callable = rotate):
    """`train_step` as a pure function of the modules' state: (state, batch, key) -> (state,
    metrics), for `jax.jit` and `lax.scan`; `graphdef`: the graph of (model, optimizer)."""

    def step(state: nnx.State, batch, key: jax.Array):
        model, optimizer = nnx.merge(graphdef, state)
        metrics = train_step(model, optimizer, batch, key, config=config, rotate_fn=rotate_fn)
        return nnx.state((model, optimizer)), metrics

    return step


def eval_model(graphdef: nnx.GraphDef, state: nnx.State) -> nnx.Module:
    """The model of the modules' `state`, in evaluation mode."""
    model, _ = nnx.merge(graphdef, state)
    model.eval()
    return model
