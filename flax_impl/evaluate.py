"""Evaluate a trained model on the test set: `python -m flax_impl.evaluate --workdir DIR`.

Prints the test accuracy and per-class accuracy and writes two pictures into the workdir (or
`--out`): `confusion.png`, the confusion matrix, and `errors.png`, misclassified test digits with
their true and predicted labels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from flax_impl.common.atomic import atomic_write
from flax_impl.common.config import OneLineParser, workdir_path
from flax_impl.common.data import load_mnist
from flax_impl.common.errors import WorkdirError, run_command
from flax_impl.common.report import quiet_library_logs
from flax_impl.common.signals import SignalWatch
from flax_impl.extras.compile_cache import use_compilation_cache
from flax_impl.predict import WorkdirReader, load_trained


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, classes: int = 10) -> np.ndarray:
    """counts[true, predicted]."""
    counts = np.zeros((classes, classes), np.int64)
    np.add.at(counts, (labels.astype(np.int64), predictions.astype(np.int64)), 1)
    return counts


def plot_confusion(counts: np.ndarray, path: Path) -> None:
    """The confusion matrix as a picture, counts written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 6))
    shown = np.log1p(counts)
    axis.imshow(shown, cmap="Blues")
    for (true, predicted), count in np.ndenumerate(counts):
        if count:
            axis.text(predicted, true, str(count), ha="center", va="center", fontsize=8,
                      color="white" if shown[true, predicted] > shown.max() / 2 else "black")
    axis.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true",
             title=f"Confusion matrix ({np.trace(counts)}/{counts.sum()} correct)")
    figure.tight_layout()
    atomic_write(path, lambda file: figure.savefig(file, dpi=100, format="png"))
    plt.close(figure)


def plot_errors(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray, path: Path,
                limit: int = 48) -> None:
    """A grid of misclassified digits titled 'true -> predicted'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wrong = np.flatnonzero(labels != predictions)[:limit]
    columns = 8
    rows = max(1, -(-len(wrong) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.3, rows * 1.5))
    for axis in np.ravel(axes):
        axis.axis("off")
    for axis, index in zip(np.ravel(axes), wrong, strict=False):
        axis.imshow(images[index], cmap="gray")
        axis.set_title(f"{labels[index]} -> {predictions[index]}", fontsize=9, color="C3")
    figure.suptitle(f"Misclassified test digits (true -> predicted), {len(wrong)} shown")
    figure.tight_layout()
    atomic_write(path, lambda file: figure.savefig(file, dpi=100, format="png"))
    plt.close(figure)


def main(argv: list[str] | None = None, readers: dict[str, WorkdirReader] | None = None,
         prog: str = "python -m flax_impl.evaluate") -> int:
    """Command-line entry point; `readers`: see `flax_impl.predict.trained_variables`."""
    parser = OneLineParser(prog=prog, description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, type=Path, help="a training workdir")
    parser.add_argument("--data-source", default=None,
                        help="default: the source the model was trained with")
    parser.add_argument("--out", type=workdir_path, default=None,
                        help="where the pictures go (default: the workdir)")
    args = parser.parse_args(argv)
    use_compilation_cache()
    quiet_library_logs()

    def body():
        out = args.out or args.workdir
        if out.exists() and not out.is_dir():
            raise WorkdirError(f"--out {out} is a file; name a directory for the pictures")
        log_probs, config = load_trained(args.workdir, readers)
        data = load_mnist(args.data_source or config.data_source)
        images, labels = data.test_images, data.test_labels
        predictions = np.concatenate([
            np.asarray(log_probs(jnp.asarray(images[i:i + 1000]))).argmax(-1)
            for i in range(0, len(images), 1000)])
        counts = confusion_matrix(labels, predictions)
        correct = int(np.trace(counts))
        print(f"Test accuracy: {correct}/{len(labels)} ({100 * correct / len(labels):.2f}%)")
        print("Per class: " + ", ".join(
            f"{digit}: {100 * counts[digit, digit] / max(counts[digit].sum(), 1):.2f}%"
            for digit in range(10)))
        out.mkdir(parents=True, exist_ok=True)
        plot_confusion(counts, out / "confusion.png")
        plot_errors(images, labels, predictions, out / "errors.png")
        print(f"Wrote {out / 'confusion.png'} and {out / 'errors.png'}")

    with SignalWatch():
        return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
