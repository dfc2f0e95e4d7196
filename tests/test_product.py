"""predict and evaluate: MNIST-style preprocessing, the commands, their errors, the pictures, and
the workdirs of both frameworks and of each recipe.

The workdirs are trained once per module on the tiny IDX source (`tiny_runs`); only the tests of
how well a model reads real digits train on real MNIST (`realdata`).
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from compare import evaluate as compare_evaluate
from flax_impl import evaluate, predict
from flax_impl import train as flax_train
from flax_impl.common.config import Config, recipe_config
from flax_impl.common.data import load_mnist
from flax_impl.common.workdir import create_workdir
from tests.conftest import (
    SHAPE_BATCH_SIZE,
    SHAPE_EPOCHS,
    SHAPE_STEPS_PER_CALL,
    TINY_TEST,
    TINY_TRAIN,
    messages,
    synthetic_mnist,
)
from torch_ref import train as torch_train


@pytest.fixture(scope="module")
def tiny_runs(tiny_idx_source, tmp_path_factory) -> dict[str, tuple]:
    """(workdir, the metrics its training returned) of: Flax's suite run ("flax"), Flax's fast
    recipe ("flax-fast") and torch's tinynet recipe ("torch-tinynet"), on the tiny source."""
    shape = {"data_source": tiny_idx_source, "batch_size": SHAPE_BATCH_SIZE}
    runs = {}
    for name, trainer, config in (
            ("flax", flax_train, Config(epochs=SHAPE_EPOCHS, **shape)),
            ("flax-fast", flax_train, recipe_config("fast", epochs=1, **shape)),
            ("torch-tinynet", torch_train, recipe_config("tinynet", epochs=1, **shape))):
        workdir = tmp_path_factory.mktemp(name) / "run"
        kwargs = {"steps_per_call": SHAPE_STEPS_PER_CALL} if trainer is flax_train else {}
        runs[name] = workdir, trainer.train(config, workdir, **kwargs)
    return runs


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


def test_predict_prints_each_images_likeliest_digits_with_their_probabilities(
        tiny_runs, tmp_path, capsys):
    workdir, _ = tiny_runs["flax"]
    paths = [tmp_path / f"digit{i}.png" for i in range(3)]
    for i, path in enumerate(paths):
        Image.fromarray(digit_like_mnist()[::1 + i]).save(path)
    assert predict.main(["--workdir", str(workdir), "--top", "3", *map(str, paths)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == list(map(str, paths))
    for line in lines:
        shown = re.findall(r"(\d) \((\d+\.\d)%\)", line.split(": ")[1])
        digits, percents = [d for d, _ in shown], [float(p) for _, p in shown]
        assert len(set(digits)) == 3 and percents == sorted(percents, reverse=True)
        assert sum(percents) <= 100.2


@pytest.fixture(scope="module")
def real_mnist():
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MNIST20K_CACHE", raising=False)  # the user's real cache
        yield load_mnist()


@pytest.fixture(scope="module")
def real_trained(tmp_path_factory):
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


@pytest.mark.slow
@pytest.mark.realdata
def test_predict_reads_real_digits(real_trained, real_mnist, tmp_path, capsys):
    paths = []
    for i in range(10):
        paths.append(tmp_path / f"digit{i}_{real_mnist.test_labels[i]}.png")
        Image.fromarray(real_mnist.test_images[i]).save(paths[-1])
    assert predict.main(["--workdir", str(real_trained), *map(str, paths)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    right = sum(line.split(": ")[1].startswith(path.stem[-1]) for line, path in
                zip(lines, paths, strict=True))
    assert right >= 8


@pytest.mark.slow
@pytest.mark.realdata
def test_predict_reads_photos_of_dark_digits_on_light_paper(real_trained, real_mnist,
                                                            tmp_path, capsys):
    paths = [tmp_path / f"photo{i}.jpg" for i in range(5)]
    for i, path in enumerate(paths):
        dark_on_light_photo(real_mnist.test_images[i], path)
    assert predict.main(["--workdir", str(real_trained), *map(str, paths)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    right = sum(line.startswith(f"{path}: {label} (") for line, path, label in
                zip(lines, paths, real_mnist.test_labels[:5], strict=True))
    assert right >= 4


@pytest.mark.parametrize("damage, message", [("text", "not an image"),
                                             ("truncated", "unreadable image")])
def test_bad_images_are_one_line_errors_before_any_model_loads(tmp_path, capsys, damage,
                                                               message):
    path = tmp_path / "bad.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(path)
    path.write_bytes(b"hello" if damage == "text" else path.read_bytes()[:200])
    assert predict.main(["--workdir", str(tmp_path / "no_workdir"), str(path)]) == 2
    said = messages(capsys.readouterr().err)
    assert len(said) == 1 and said[0].startswith(f"error: {path}: {message}")


def test_a_missing_workdir_or_checkpoint_is_one_line_and_reading_creates_nothing(tmp_path,
                                                                                 capsys):
    image = tmp_path / "x.png"
    Image.fromarray(digit_like_mnist()).save(image)
    assert predict.main(["--workdir", str(tmp_path / "nope"), str(image)]) == 2
    assert messages(capsys.readouterr().err) == [
        f"error: --workdir {tmp_path / 'nope'}: no such directory; train with `python -m "
        f"flax_impl.train --workdir {tmp_path / 'nope'}` first"]
    assert not (tmp_path / "nope").exists()
    empty = tmp_path / "empty"
    create_workdir(empty, Config(), "flax")  # a run's config.json, no checkpoint yet
    assert evaluate.main(["--workdir", str(empty)]) == 2
    assert messages(capsys.readouterr().err) == [
        f"error: no checkpoint in {empty / 'checkpoints'}"]
    assert sorted(p.name for p in empty.iterdir()) == ["config.json"]  # reading created nothing


def test_evaluate_scores_as_the_training_did_and_draws_the_pictures(tiny_runs, tmp_path,
                                                                    capsys):
    workdir, history = tiny_runs["flax"]
    before = {str(p): p.stat().st_mtime_ns for p in workdir.rglob("*")}
    assert evaluate.main(["--workdir", str(workdir), "--out", str(tmp_path)]) == 0
    assert {str(p): p.stat().st_mtime_ns for p in workdir.rglob("*")} == before  # read only
    out = capsys.readouterr().out
    correct = round(history[-1]["test_accuracy"] * TINY_TEST)
    assert f"Test accuracy: {correct}/{TINY_TEST} (" in out
    assert re.search(r"Per class: 0: [\d.]+%, 1: .*, 9: [\d.]+%", out)
    for name in ("confusion.png", "errors.png"):
        with Image.open(tmp_path / name) as picture:
            assert picture.format == "PNG" and picture.size[0] > 300


def test_confusion_matrix_counts_true_by_predicted():
    counts = evaluate.confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), 3)
    np.testing.assert_array_equal(counts, [[1, 1, 0], [0, 1, 0], [0, 1, 0]])


def evaluated(workdir, capsys) -> int:
    """The test accuracy `python -m compare.evaluate` prints for `workdir` (the correct count)."""
    assert compare_evaluate.main(["--workdir", str(workdir), "--out", str(workdir)]) == 0
    return int(capsys.readouterr().out.split("Test accuracy: ")[1].split("/")[0])


def torch_near_ties(workdir) -> int:
    """The tiny test images whose two likeliest digits the torch model of `workdir` scores
    within twice parity's output tolerance: in another framework, whose float32 sums round
    otherwise, such an image may go either way."""
    import torch

    from compare.parity import EVAL_TOLERANCE
    from torch_ref.model import create_model, to_inputs

    config = json.loads((workdir / "config.json").read_text())
    model = create_model(config["model"], 0.0, config["widths"]).eval()
    model.load_state_dict(torch.load(workdir / "model.pt", weights_only=True))
    images = torch.from_numpy(synthetic_mnist(TINY_TRAIN, TINY_TEST).test_images)
    with torch.no_grad():
        best, second = np.sort(model(to_inputs(images)).numpy(), -1)[:, :-3:-1].T
    return int(np.sum(best - second <= 2 * EVAL_TOLERANCE))


@pytest.mark.parametrize("name, recipe, model", [("flax-fast", "fast", "widenet"),
                                                 ("torch-tinynet", "tinynet", "tinynet")])
def test_a_recipes_workdir_records_its_network_and_is_evaluated_as_its_training_scored_it(
        name, recipe, model, tiny_runs, tmp_path, capsys):
    workdir = shutil.copytree(tiny_runs[name][0], tmp_path / "run")
    recorded = json.loads((workdir / "config.json").read_text())
    assert (recorded["recipe"], recorded["model"]) == (recipe, model)
    scored = round(tiny_runs[name][1][-1]["test_accuracy"] * TINY_TEST)
    # Flax's workdir: the training's own evaluation program, the same bits. torch's: its weights
    # scored in Flax, exactly but for the images on a near-tie.
    allowed = torch_near_ties(workdir) if name.startswith("torch") else 0
    assert abs(evaluated(workdir, capsys) - scored) <= allowed


def test_a_torch_workdir_is_evaluated_through_the_weight_conversion_only(tiny_runs, tmp_path,
                                                                         capsys):
    import torch

    workdir = shutil.copytree(tiny_runs["torch-tinynet"][0], tmp_path / "run")
    # The port reads no torch file itself: it names the command that converts the weights.
    assert evaluate.main(["--workdir", str(workdir)]) == 2
    said = messages(capsys.readouterr().err)
    assert len(said) == 1 and "holds a torch run" in said[0] and "compare.evaluate" in said[0]
    correct = evaluated(workdir, capsys)
    # Without model.pt (an unfinished run) the latest checkpoint's weights are used.
    (workdir / "model.pt").unlink()
    assert evaluated(workdir, capsys) == correct
    torch.save({"not": "a checkpoint"}, workdir / "checkpoint.pt")
    assert compare_evaluate.main(["--workdir", str(workdir)]) == 2
    said = messages(capsys.readouterr().err)
    assert len(said) == 1 and said[0].startswith(
        f"error: {workdir / 'checkpoint.pt'} is corrupt or not a torch_ref.train file")


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
    assert messages(capsys.readouterr().err) == [f"error: {tmp_path / 'x.png'}: no such file"]
