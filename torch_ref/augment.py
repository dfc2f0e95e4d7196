"""Random rotation on tensors (no torchvision): `affine_grid` + bilinear `grid_sample`.

Mirrors `flax_impl/augment.py`: the same angle gives the same image, pixels outside the input read 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image of (B, C, H, W) counter-clockwise by its angle in degrees, about its centre.

    Bilinear interpolation; pixels that come from outside the image are 0.
    """
    radians = degrees.to(images.dtype) * (math.pi / 180.0)
    cos, sin, zero = torch.cos(radians), torch.sin(radians), torch.zeros_like(radians)
    # affine_grid maps each output position to the input position it reads.
    theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_rotate(images: torch.Tensor, max_degrees: float, generator: torch.Generator,
                  part: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Rotate each image by an angle drawn uniformly from [-max_degrees, max_degrees].

    The angles come from `generator` (a CPU one: the same angles on every device). `part` (i, n):
    the images are part i of n equal parts of a batch (one rank's share); the angles of the whole
    batch are drawn and part i's kept, so that n ranks rotate as one process would.
    """
    if max_degrees == 0:
        return images
    index, parts = part
    drawn = torch.rand(len(images) * parts, generator=generator)
    degrees = (drawn[index * len(images):(index + 1) * len(images)] * 2 - 1).to(images.device)
    return rotate(images, degrees * max_degrees)
