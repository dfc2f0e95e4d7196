"""predict and evaluate: MNIST-style preprocessing, the commands, their errors, the pictures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from compare import evaluate as compare_evaluate
from flax_impl import evaluate, predict
from flax_impl import train as flax_train
from flax_impl.common.config import Config, recipe_config
from flax_impl.common.data import load_mnist
from tests.conftest import synthetic_mnist

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_mnist():
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MNIST20K_CACHE", raising=False)  # the user's real cache
        yield load_mnist()


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    """Net after one short epoch on real MNIST (about 97 % test accuracy)."""
    workdir = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MNIST20K_CACHE", raising=False)
        # Two calls of 50 steps: one train chunk to compile.
        flax_train.train(Config(epochs=1, train_examples=12_800), workdir, steps_per_call=50)
    return workdir


def dark_on_light_photo(digit: np.ndarray, path) -> None:
    """A big RGB picture of a dark digit on a light background, off centre."""
    big = Image.fromarray(255 - digit).resize((150, 180)).convert("RGB")
    canvas = Image.new("RGB", (400, 300), (250, 245, 240))
    canvas.paste(big, (30, 100))
    canvas.save(path)


def test_mnist_style_preprocessing_inverts_crops_fits_and_centres():
    image = Image.new("RGB", (300, 200), (255, 255, 255))
    image.paste((0, 0, 0), (20, 30, 60, 190))  # a dark bar 40 wide, 160 high, near the left
    digit = predict.mnist_style(image)
    assert digit.shape == (28, 28) and digit.dtype == np.uint8
    assert digit[0, 0] == 0 and digit.max() > 200  # white on black
    rows, cols = np.nonzero(digit > 50)
    assert rows.max() - rows.min() + 1 <= 21 and cols.max() - cols.min() + 1 <= 8
    grid_rows, grid_cols = np.indices(digit.shape)
    mass = digit.astype(float).sum()
    assert abs((grid_rows * digit).sum() / mass - 13.5) <= 1.0
    assert abs((grid_cols * digit).sum() / mass - 13.5) <= 1.0


@pytest.mark.realdata
def test_predict_prints_the_digit_and_its_probability(trained_workdir, real_mnist, tmp_path,
                                                      capsys):
    paths = []
    for i in range(10):
        paths.append(tmp_path / f"digit{i}_{real_mnist.test_labels[i]}.png")
        Image.fromarray(real_mnist.test_images[i]).save(paths[-1])
    assert predict.main(["--workdir", str(trained_workdir), "--top", "3",
                         *map(str, paths)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 10
    assert all(line.count("%)") == 3 for line in lines)
    right = sum(line.split(": ")[1].startswith(path.stem[-1]) for line, path in
                zip(lines, paths, strict=True))
    assert right >= 8


@pytest.mark.realdata
def test_predict_handles_photos_of_dark_digits_on_light_paper(trained_workdir, real_mnist,
                                                              tmp_path, capsys):
    right = 0
    for i in range(5):
        path = tmp_path / f"photo{i}.jpg"
        dark_on_light_photo(real_mnist.test_images[i], path)
        assert predict.main(["--workdir", str(trained_workdir), str(path)]) == 0
        right += capsys.readouterr().out.startswith(f"{path}: {real_mnist.test_labels[i]} (")
    assert right >= 4


@pytest.mark.parametrize("damage, message", [("text", "not an image"),
                                             ("truncated", "unreadable image")])
def test_bad_images_are_one_line_errors(trained_workdir, tmp_path, capsys, damage, message):
    path = tmp_path / "bad.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(path)
    path.write_bytes(b"hello" if damage == "text" else path.read_bytes()[:200])
    assert predict.main(["--workdir", str(trained_workdir), str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_missing_workdir_or_checkpoint_is_one_line_error(tmp_path, capsys, trained_workdir):
    image = tmp_path / "x.png"
    Image.fromarray(synthetic_mnist(0, 1).test_images[0]).save(image)
    assert predict.main(["--workdir", str(tmp_path / "nope"), str(image)]) == 2
    assert "no such directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((trained_workdir / "config.json").read_text())
    assert evaluate.main(["--workdir", str(empty)]) == 2
    assert "no checkpoint in" in capsys.readouterr().err
    assert sorted(p.name for p in empty.iterdir()) == ["config.json"]  # reading created nothing


@pytest.mark.realdata
def test_evaluate_reports_accuracy_and_draws_the_pictures(trained_workdir, real_mnist, tmp_path,
                                                          capsys):
    before = sorted(str(p) for p in trained_workdir.rglob("*"))
    assert evaluate.main(["--workdir", str(trained_workdir), "--out", str(tmp_path)]) == 0
    assert sorted(str(p) for p in trained_workdir.rglob("*")) == before  # read, not written
    out = capsys.readouterr().out
    correct = int(out.split("Test accuracy: ")[1].split("/")[0])
    assert correct > 9000 and "/10000 (" in out and "Per class: 0: " in out
    for name in ("confusion.png", "errors.png"):
        with Image.open(tmp_path / name) as picture:
            assert picture.size[0] > 300
    assert (trained_workdir / "curves.png").is_file()


def test_confusion_matrix_counts_true_by_predicted():
    counts = evaluate.confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), 3)
    np.testing.assert_array_equal(counts, [[1, 1, 0], [0, 1, 0], [0, 1, 0]])


@pytest.mark.realdata
def test_a_torch_workdir_is_evaluated_through_the_weight_conversion(real_mnist, tmp_path,
                                                                    capsys):
    import torch

    from torch_ref import train as torch_train

    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MNIST20K_CACHE", raising=False)
        history = torch_train.train(Config(epochs=1, train_examples=6_400), tmp_path)
    capsys.readouterr()
    # The port reads no torch file itself: it names the command that converts the weights.
    assert evaluate.main(["--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds a torch run" in err and "compare.evaluate" in err and len(err.splitlines()) == 1
    assert compare_evaluate.main(["--workdir", str(tmp_path), "--out", str(tmp_path)]) == 0
    correct = int(capsys.readouterr().out.split("Test accuracy: ")[1].split("/")[0])
    assert correct == round(history[-1]["test_accuracy"] * 10_000)  # as torch scored it
    # Without model.pt (an unfinished run) the latest checkpoint's weights are used.
    (tmp_path / "model.pt").unlink()
    assert compare_evaluate.main(["--workdir", str(tmp_path), "--out", str(tmp_path)]) == 0
    assert f"Test accuracy: {correct}/10000" in capsys.readouterr().out
    torch.save({"not": "a checkpoint"}, tmp_path / "checkpoint.pt")
    assert compare_evaluate.main(["--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "checkpoint.pt is corrupt or not a torch_ref.train file" in err
    assert len(err.splitlines()) == 1


@pytest.mark.realdata
@pytest.mark.parametrize("framework", ["flax", "torch"])
@pytest.mark.parametrize("recipe, model", [("tinynet", "tinynet"), ("fast", "widenet")])
def test_a_recipes_workdir_records_its_network_and_is_evaluated_as_its_training_scored_it(
        framework, recipe, model, real_mnist, tmp_path, capsys):
    from torch_ref import train as torch_train

    trainer = flax_train if framework == "flax" else torch_train
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MNIST20K_CACHE", raising=False)
        history = trainer.train(recipe_config(recipe, epochs=1, train_examples=3_200),
                                tmp_path)
    capsys.readouterr()
    recorded = json.loads((tmp_path / "config.json").read_text())
    assert (recorded["recipe"], recorded["model"]) == (recipe, model)
    assert compare_evaluate.main(["--workdir", str(tmp_path), "--out", str(tmp_path)]) == 0
    correct = int(capsys.readouterr().out.split("Test accuracy: ")[1].split("/")[0])
    assert correct == round(history[-1]["test_accuracy"] * 10_000)


def digit_like_mnist() -> np.ndarray:
    """A white 7-ish stroke on black, 60x60."""
    canvas = np.zeros((60, 60), np.uint8)
    canvas[10:16, 12:48] = 255
    for row in range(16, 52):
        canvas[row, 44 - (row - 16) // 2: 50 - (row - 16) // 2] = 255
    return canvas


def as_read(path) -> np.ndarray:
    return predict.read_image(path)


def test_sixteen_bit_and_palette_pngs_read_as_their_eight_bit_twin(tmp_path):
    digit = digit_like_mnist()
    Image.fromarray(digit).save(tmp_path / "eight.png")
    Image.fromarray(digit.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    Image.fromarray(digit).convert("P").save(tmp_path / "palette.png")
    assert Image.open(tmp_path / "sixteen.png").mode.startswith("I")
    assert Image.open(tmp_path / "palette.png").mode == "P"
    expected = as_read(tmp_path / "eight.png")
    assert expected.max() > 200
    np.testing.assert_array_equal(as_read(tmp_path / "sixteen.png"), expected)
    np.testing.assert_array_equal(as_read(tmp_path / "palette.png"), expected)


def test_transparency_is_composited_on_the_background_it_implies(tmp_path):
    ink = digit_like_mnist() > 0
    expected_source = Image.fromarray(np.where(ink, 0, 255).astype(np.uint8))  # black on white
    expected_source.save(tmp_path / "opaque.png")
    expected = as_read(tmp_path / "opaque.png")
    black_on_clear = np.zeros((60, 60, 4), np.uint8)
    black_on_clear[..., 3] = np.where(ink, 255, 0)  # black strokes, transparent elsewhere
    Image.fromarray(black_on_clear, "RGBA").save(tmp_path / "black.png")
    white_on_clear = black_on_clear.copy()
    white_on_clear[..., :3] = 255
    Image.fromarray(white_on_clear, "RGBA").save(tmp_path / "white.png")
    np.testing.assert_array_equal(as_read(tmp_path / "black.png"), expected)
    np.testing.assert_array_equal(as_read(tmp_path / "white.png"), expected)


def test_exif_orientation_is_applied(tmp_path):
    digit = Image.fromarray(digit_like_mnist())
    digit.save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view": the pixels are stored turned
    digit.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "turned.png", exif=exif)
    np.testing.assert_array_equal(as_read(tmp_path / "turned.png"),
                                  as_read(tmp_path / "upright.png"))


def test_an_oversized_image_is_refused_in_one_line_before_decoding(tmp_path, monkeypatch):
    Image.fromarray(digit_like_mnist()).save(tmp_path / "big.png")
    monkeypatch.setattr(predict, "MAX_PIXELS", 59 * 60)
    with pytest.raises(predict.ImageError, match=r"big.png: 60x60 pixels is too large"):
        predict.read_image(tmp_path / "big.png")


def test_a_missing_image_is_reported_before_the_model_loads(tmp_path, capsys):
    # No workdir exists at all: the image is checked first, so its error is the one reported.
    assert predict.main(["--workdir", str(tmp_path / "nowhere"), str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'x.png'}: no such file"
