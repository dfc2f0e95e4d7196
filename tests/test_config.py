"""flax_impl.common.config: recipes as presets, flags on top of them, validation splits."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from flax_impl.common.config import RECIPES, Config, build_parser, config_from_args
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


def test_an_unknown_recipe_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        parse("--recipe", "fastest")
    assert "invalid choice: 'fastest'" in capsys.readouterr().err


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
