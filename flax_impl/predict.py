"""Classify digit images with a trained model: `python -m flax_impl.predict --workdir DIR IMAGE...`.

Any PNG/JPEG (colour or grey, 8 or 16 bits, a palette, transparency, EXIF orientation; up to
MAX_PIXELS) is preprocessed the way MNIST was made: grey, inverted if
it is dark-on-light, cropped to the digit, scaled to fit 20x20, centred by its centre of mass in
28x28, normalised. Prints per file the digit and its probability (`--top K` for the K best).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image, ImageOps, UnidentifiedImageError

from flax_impl.common.config import OneLineParser
from flax_impl.common.errors import DataError, WorkdirError, run_command
from flax_impl.common.report import quiet_library_logs
from flax_impl.common.signals import SignalWatch
from flax_impl.common.workdir import load_config, run_identity, workdir_record
from flax_impl.extras.compile_cache import use_compilation_cache
from flax_impl.extras.distributed import check_backend
from flax_impl.extras.kernels import STOCK
from flax_impl.model import create_model, to_inputs
from flax_impl.train import CHECKPOINT_DIR, create_port, restore_checkpoint


def restore_variables(workdir: str | Path) -> dict:
    """The linen variables ({"params", "batch_stats"}) of the model a training workdir scored,
    from its latest checkpoint, on the first device."""
    config = load_config(workdir)
    if not (Path(workdir) / CHECKPOINT_DIR).is_dir():
        raise WorkdirError(f"no checkpoint in {Path(workdir) / CHECKPOINT_DIR}")
    port = create_port(config, 1, STOCK)
    # A concrete initial state on the first device as the target (Orbax before 0.12 cannot
    # restore the NNX dropout stream's typed key into a ShapeDtypeStruct).
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.jit(port.init, out_shardings=device)(jax.random.key(0))
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, max_to_keep=None,
                                           save_interval_steps=0, enable_async_checkpointing=False)
    with ocp.CheckpointManager((Path(workdir) / CHECKPOINT_DIR).absolute(),
                               options=options) as manager:
        restored = restore_checkpoint(manager, target, run_identity(config))
    if restored is None:
        raise WorkdirError(f"no checkpoint in {Path(workdir) / CHECKPOINT_DIR}")
    return port.variables(restored[1])


# A framework's reader of its workdirs: the workdir -> the Flax variables of the model it scored.
WorkdirReader = Callable[[Path], dict]
READERS: dict[str, WorkdirReader] = {"flax": restore_variables}


class ImageError(DataError):
    """An image that cannot be classified, described in one line."""


def trained_variables(workdir: str | Path, readers: dict[str, WorkdirReader] | None = None) -> dict:
    """The Flax variables of a workdir, read by the reader of the framework that trained it
    (`readers` add to READERS: `compare.workdirs` passes the torch one, a weight conversion)."""
    framework = workdir_record(workdir)["framework"]
    readers = {**READERS, **(readers or {})}
    if framework not in readers:
        raise WorkdirError(f"{workdir} holds a {framework} run; read it with `python -m "
                           f"compare.evaluate` or `python -m compare.predict` (the same flags), "
                           f"which convert its weights to Flax")
    return readers[framework](Path(workdir))


def load_trained(workdir: str | Path, readers: dict[str, WorkdirReader] | None = None):
    """(jitted log-probability function of uint8 (B, 28, 28) images, config) of a workdir.

    `readers`: see `trained_variables` (with `compare.workdirs.READERS`, a torch_ref.train
    workdir works too). Reads the workdir only: nothing in it is created or changed.
    """
    check_backend()
    if not Path(workdir).is_dir():
        raise WorkdirError(f"--workdir {workdir}: no such directory; train with "
                           f"`python -m flax_impl.train --workdir {workdir}` first")
    config = load_config(workdir)
    variables = trained_variables(workdir, readers)
    model = create_model(config.model, config.dropout, config.widths)

    @jax.jit
    def log_probs(images):
        return model.apply(variables, to_inputs(images))

    return log_probs, config


MAX_PIXELS = 50_000_000  # larger images are refused before they are decoded


def grey_pixels(image: Image.Image) -> np.ndarray:
    """An image as users have it -> float32 grey in [0, 255], upright.

    EXIF orientation applied; 16-bit (and 32-bit integer) grey scaled to 8 bits, not cut;
    palettes expanded; transparency composited on the background the image implies: white
    behind dark strokes, black behind light ones.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        values = np.asarray(image, np.float64)
        if image.mode.startswith("I;16") or 255 < values.max() <= 65535:
            values = values * (255.0 / 65535.0)
        elif values.max() > 65535:
            values = values * (255.0 / np.iinfo(np.int32).max)
        return values.astype(np.float32)
    if image.mode == "F":
        values = np.asarray(image, np.float32)
        return values * 255.0 if values.max() <= 1.0 else values
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        grey = np.asarray(rgba.convert("L"), np.float32)
        alpha = np.asarray(rgba.getchannel("A"), np.float32) / 255.0
        if alpha.min() < 1.0:
            strokes = (grey * alpha).sum() / max(alpha.sum(), 1e-6)  # the opaque pixels' grey
            background = 0.0 if strokes > 127 else 255.0
            return grey * alpha + background * (1 - alpha)
        return grey
    return np.asarray(image.convert("L"), np.float32)


def mnist_style(image: Image.Image) -> np.ndarray:
    """Any picture of one digit -> uint8 (28, 28), white digit on black, as MNIST's were made."""
    grey = grey_pixels(image)
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    if np.median(border) > 127:  # dark digit on a light background
        grey = 255.0 - grey
    grey = np.clip(grey - np.median(border if np.median(border) <= 127 else 255.0 - border),
                   0, 255)
    mask = grey > 0.25 * grey.max() if grey.max() > 0 else np.zeros_like(grey, bool)
    if not mask.any():
        raise ImageError("no digit found (the image is blank)")
    rows, cols = np.nonzero(mask)
    crop = grey[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    scale = 20.0 / max(crop.shape)
    size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
    digit = np.asarray(Image.fromarray(crop.astype(np.uint8)).resize(size, Image.LANCZOS),
                       np.float32)
    canvas = np.zeros((28, 28), np.float32)
    top, left = (28 - digit.shape[0]) // 2, (28 - digit.shape[1]) // 2
    canvas[top:top + digit.shape[0], left:left + digit.shape[1]] = digit
    total = canvas.sum()
    if total > 0:
        grid_rows, grid_cols = np.indices(canvas.shape)
        shift = (round(13.5 - (grid_rows * canvas).sum() / total),
                 round(13.5 - (grid_cols * canvas).sum() / total))
        canvas = np.roll(canvas, shift, axis=(0, 1))
    return np.clip(canvas, 0, 255).astype(np.uint8)


def read_image(path: Path) -> np.ndarray:
    """A file -> MNIST-style uint8 (28, 28); ImageError with one line if it cannot be."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ImageError(f"{width}x{height} pixels is too large (at most "
                                 f"{MAX_PIXELS:,}); scale it down first")
            image.load()
            return mnist_style(image)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: a directory, not an image") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{path}: too large to decode safely; scale it down first") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image (PNG, JPEG, ...)") from None
    except (OSError, SyntaxError) as error:
        raise ImageError(f"{path}: unreadable image ({error})") from None
    except ImageError as error:
        raise ImageError(f"{path}: {error}") from None


def main(argv: list[str] | None = None, readers: dict[str, WorkdirReader] | None = None,
         prog: str = "python -m flax_impl.predict") -> int:
    """Command-line entry point; `readers`: see `trained_variables`."""
    parser = OneLineParser(prog=prog, description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, type=Path, help="a training workdir")
    parser.add_argument("--top", type=int, default=1, help="show the K most likely digits")
    parser.add_argument("images", nargs="+", type=Path)
    args = parser.parse_args(argv)
    if not 1 <= args.top <= 10:
        parser.error(f"--top must be between 1 and 10, got {args.top}")
    use_compilation_cache()
    quiet_library_logs()

    def body():
        images = np.stack([read_image(path) for path in args.images])  # before the model loads
        log_probs, _ = load_trained(args.workdir, readers)
        probabilities = np.exp(np.asarray(log_probs(jnp.asarray(images))))
        for path, probs in zip(args.images, probabilities, strict=True):
            best = np.argsort(-probs)[:args.top]
            print(f"{path}: " + ", ".join(f"{d} ({100 * probs[d]:.1f}%)" for d in best))

    with SignalWatch():
        return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
