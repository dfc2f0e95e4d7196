"""flax_impl.common.config: recipes as presets, flags on top of them, the values no run can use,
validation splits, each command's own flags."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from flax_impl.common.config import (
    RECIPES,
    STEPS_PER_CALL,
    Config,
    build_parser,
    config_from_args,
)
from flax_impl.common.errors import ConfigError
from tests.conftest import synthetic_mnist


def parse(*argv: str) -> Config:
    return config_from_args(build_parser("test", "test").parse_args(list(argv)))


def test_no_flags_give_the_documented_default_recipe():
    assert parse() == Config() and Config().recipe == "default"


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_a_recipe_sets_its_fields_and_given_flags_override_them(recipe):
    preset = parse("--recipe", recipe)
    assert preset.recipe == recipe
    assert {k: getattr(preset, k) for k in RECIPES[recipe]} == RECIPES[recipe]
    overridden = parse("--recipe", recipe, "--epochs", "7", "--lr", "0.03")
    assert dataclasses.replace(preset, epochs=7, lr=0.03) == overridden


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs must be > 0, got 0"),
    (["--batch-size", "0"], "--batch-size must be > 0, got 0"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--lr", "0"], "--lr must be > 0, got 0.0"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0, got -1.0"),
    (["--warmup-fraction", "1"], "--warmup-fraction must be in (0, 1), got 1.0"),
    (["--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
    (["--max-rotation", "180.5"], "--max-rotation must be in [0, 180] degrees, got 180.5"),
    (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1), got 1.0"),
    (["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
    (["--seed", str(2**32)], f"--seed must be in [0, 2**32), got {2**32}"),
    (["--validation", "-1"], "--validation must be >= 0, got -1"),
    (["--train-examples", "0"], "--train-examples must be > 0, got 0"),
    (["--widths", "1,2,3,4,5,0"], "--widths needs 6 positive integers for net (e.g. 10,16,16,16,24,32), "
                                  "got 1,2,3,4,5,0"),
])
def test_a_value_no_run_can_use_is_refused_saying_which_and_why(flags, message):
    with pytest.raises(ConfigError) as refused:
        parse(*flags)
    assert str(refused.value) == message


def test_the_values_at_the_edges_of_their_ranges_are_accepted():
    config = parse("--max-rotation", "180", "--dropout", "0", "--seed", str(2**32 - 1),
                   "--weight-decay", "0", "--model", "tinynet", "--widths", "1,1,1,1,1,1")
    assert (config.max_rotation, config.seed, config.widths) == (180.0, 2**32 - 1, (1,) * 6)


def test_a_run_needs_a_full_batch_and_batches_that_divide_over_its_devices():
    assert Config(batch_size=64).steps_per_epoch(200) == 3  # the last partial batch dropped
    with pytest.raises(ConfigError, match="--batch-size 100 is larger than the 99 training"):
        Config(batch_size=100).steps_per_epoch(99)
    Config(batch_size=64, eval_batch_size=100).check_devices(2)
    with pytest.raises(ConfigError, match="must divide evenly over 3 devices"):
        Config(batch_size=64).check_devices(3)


def test_the_flax_command_has_its_own_flags_and_the_torch_one_none_of_them(capsys):
    args = build_parser("flax", "", "flax").parse_args(
        ["--api", "nnx", "--steps-per-call", "5", "--kernels", "stock"])
    assert (args.api, args.steps_per_call, args.kernels) == ("nnx", 5, "stock")
    assert config_from_args(args).api == "nnx"
    assert build_parser("flax", "", "flax").parse_args([]).steps_per_call == STEPS_PER_CALL
    with pytest.raises(SystemExit):
        build_parser("flax", "", "flax").parse_args(["--steps-per-call", "0"])
    assert "--steps-per-call: must be > 0, got 0" in capsys.readouterr().err
    for flag in ("--api", "--steps-per-call", "--kernels"):
        with pytest.raises(SystemExit):
            build_parser("torch", "").parse_args([flag, "1"])
        assert f"unrecognized arguments: {flag} 1" in capsys.readouterr().err


def test_the_validation_split_is_the_last_training_images():
    mnist = synthetic_mnist(100, 10)
    config = Config(validation=30)
    images, labels = config.evaluation_set(mnist)
    np.testing.assert_array_equal(images, mnist.train_images[70:])
    np.testing.assert_array_equal(labels, mnist.train_labels[70:])
    assert config.training_images(100) == 70 and config.eval_split == "val"
    assert Config().evaluation_set(mnist)[0] is mnist.test_images
    with pytest.raises(ConfigError, match="--train-examples 80 is more than the 70 training "
                                          "images not held out for validation"):
        Config(validation=30, train_examples=80).training_images(100)


def test_widths_given_as_any_sequence_are_held_as_a_tuple():
    config = Config(model="net", widths=[8, 10, 12, 12, 14, 14])  # as config.json's list
    assert config.widths == (8, 10, 12, 12, 14, 14)
    assert config == Config(model="net", widths=(8, 10, 12, 12, 14, 14))
    assert hash(config) == hash(Config(model="net", widths=(8, 10, 12, 12, 14, 14)))
    assert Config().widths is None


def test_a_recorded_config_with_widths_loads_as_the_same_config(tmp_path):
    from flax_impl.common.workdir import create_workdir, load_config

    config = Config(model="net", widths=(6, 8, 10, 10, 12, 12), epochs=3)
    create_workdir(tmp_path / "run", config, "flax")
    assert load_config(tmp_path / "run") == config
