"""Linear measurement operators y = H x + n for image restoration, each with its singular value decomposition.

Every operator acts on a batch of images x of shape (B, C, H, W) and is given twice:

* directly (:meth:`LinearOperator.forward`, :meth:`LinearOperator.adjoint`): masking, average pooling, circular
  convolution by the FFT, identity;
* through its SVD H = U S V^T (Kawar et al. 2022, "Denoising Diffusion Restoration Models", sec. 3-4): ``vt`` maps x
  to its spectral coefficients V^T x (a tensor shaped like x, complex for the FFT), ``v`` maps them back, ``ut`` places
  U^T y on the coefficients with singular value s > 0 (zero elsewhere) and ``u`` reads them back into measurement
  space. ``singular`` holds s, shaped to broadcast over the coefficients.

From the SVD come the exact pseudo-inverse H^+ y = V S^+ U^T y, its noise-regularised form
H^T (H H^T + s_y^2 I)^-1 y (the baseline restorations are measured against, and where sampling starts from), and
the matrix that PiGDM inverts, (r^2 H H^T + s_y^2 I)^-1 = U diag(1 / (r^2 s^2 + s_y^2)) U^T
(:meth:`LinearOperator.gram_solve`).

Operators:

* :class:`Inpaint`     H x = m * x for a 0/1 mask m (1 = observed); y is image-shaped, zero where not observed.
  V = U = I, s = m.
* :class:`Downsample`  average pooling over f x f blocks (super-resolution by f). V^T is the orthonormal f x f block
  DCT-II, whose DC coefficient is (sum of the block) / f, so s = 1 / f there and 0 on the other coefficients.
* :class:`Blur`        circular convolution with a periodised Gaussian of standard deviation ``std`` pixels. It is
  diagonal in the unitary 2-D DFT, with the kernel's (real, positive) DFT as singular values: U = V = F^-1.
* :class:`Identity`    denoising: s = 1.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .errors import AccelkitError

TASKS = ("inpaint", "super-resolution", "deblur", "denoise")


class LinearOperator:
    """H = U S V^T on images of shape ``image_shape`` = (C, H, W); subclasses define the direct and spectral maps."""

    name: str = "operator"
    image_shape: tuple[int, int, int]
    #: Singular values s, shaped to broadcast against ``vt(x)`` (real, non-negative).
    singular: Tensor

    # direct form
    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def adjoint(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, x: Tensor) -> Tensor:
        return self.forward(x)

    # spectral form
    def vt(self, x: Tensor) -> Tensor:
        return x

    def v(self, z: Tensor) -> Tensor:
        return z

    def ut(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    def u(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def measurement_shape(self) -> tuple[int, ...]:
        return self.image_shape

    def s(self, like: Tensor) -> Tensor:
        """The singular values on ``like``'s device, in its real dtype."""
        real = like.real.dtype if like.is_complex() else like.dtype
        return self.singular.to(device=like.device, dtype=real)

    def pinv(self, y: Tensor, rcond: float = 1e-3) -> Tensor:
        """H^+ y = V S^+ U^T y, singular values below ``rcond`` times the largest treated as zero (as numpy's pinv)."""
        z = self.ut(y)
        s = self.s(z)
        keep = s > rcond * float(self.singular.max())
        return self.v(torch.where(keep, z / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(z)))

    def regularized_pinv(self, y: Tensor, noise_var: float) -> Tensor:
        """H^T (H H^T + s_y^2 I)^-1 y = V diag(s / (s^2 + s_y^2)) U^T y: the pseudo-inverse regularised by the noise
        (the Wiener filter for a blur; H^+ y at zero noise; zero-filled y / (1 + s_y^2) for a mask)."""
        z = self.ut(y)
        s = self.s(z)
        keep = s > 0
        gain = torch.where(keep, s / torch.where(keep, s**2 + noise_var, torch.ones_like(s)), torch.zeros_like(s))
        return self.v(gain * z)

    def gram_solve(self, y: Tensor, r2: Tensor | float, noise_var: float) -> Tensor:
        """(r^2 H H^T + s_y^2 I)^-1 y; ``r2`` a scalar or per-sample (B,) tensor."""
        z = self.ut(y)
        s = self.s(z)
        r2 = torch.as_tensor(r2, dtype=s.dtype, device=z.device)
        r2 = r2.reshape(-1, *([1] * (z.ndim - 1))) if r2.ndim else r2
        return self.u(z / (r2 * s**2 + noise_var))

    def matrix(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """H as a dense (measurements x pixels) matrix, from its action on the standard basis (small images only)."""
        n = math.prod(self.image_shape)
        basis = torch.eye(n, dtype=dtype).reshape(n, *self.image_shape)
        return self.forward(basis).reshape(n, -1).T

    def select(self, rows: Tensor) -> LinearOperator:
        """The operator for a subset of the batch (only a per-image mask differs between rows)."""
        return self

    def config(self) -> dict[str, Any]:
        return {"task": self.name}


class Identity(LinearOperator):
    """Denoising: H = I."""

    name = "denoise"

    def __init__(self, image_shape: tuple[int, int, int]):
        self.image_shape = tuple(image_shape)
        self.singular = torch.ones(())

    def forward(self, x):
        return x

    def adjoint(self, y):
        return y

    def ut(self, y):
        return y

    def u(self, z):
        return z


class Inpaint(LinearOperator):
    """Masking: H x = m * x with m in {0, 1} (1 = observed), one mask for all images or one per image."""

    name = "inpaint"

    def __init__(self, mask: Tensor):
        if mask.ndim != 4:
            raise ValueError(f"mask of shape {tuple(mask.shape)}: expected (B or 1, C or 1, H, W)")
        self.mask = (mask != 0).to(torch.float64)
        self.image_shape = tuple(mask.shape[1:])
        self.singular = self.mask

    def _m(self, x: Tensor) -> Tensor:
        return self.mask.to(device=x.device, dtype=x.real.dtype if x.is_complex() else x.dtype)

    def forward(self, x):
        return self._m(x) * x

    def adjoint(self, y):
        return self._m(y) * y

    def ut(self, y):
        return self._m(y) * y

    def u(self, z):
        return self._m(z) * z

    def select(self, rows):
        return self if self.mask.shape[0] == 1 else Inpaint(self.mask[rows.to(self.mask.device)])

    def config(self):
        return {"task": self.name, "observed_fraction": float(self.mask.mean())}


def dct_matrix(n: int) -> Tensor:
    """The orthonormal DCT-II matrix D (n x n, float64): D[k, i] = c_k cos(pi (i + 1/2) k / n)."""
    i = torch.arange(n, dtype=torch.float64)
    k = i[:, None]
    d = torch.cos(math.pi * (i[None] + 0.5) * k / n) * math.sqrt(2.0 / n)
    d[0] = 1.0 / math.sqrt(n)
    return d


class Downsample(LinearOperator):
    """Average pooling over ``factor`` x ``factor`` blocks: y has shape (C, H / f, W / f)."""

    name = "super-resolution"

    def __init__(self, image_shape: tuple[int, int, int], factor: int):
        c, h, w = image_shape
        if factor < 1 or h % factor or w % factor:
            raise ValueError(f"factor {factor} does not divide the image size {h}x{w}")
        self.image_shape, self.factor = tuple(image_shape), int(factor)
        self.dct = dct_matrix(factor)
        s = torch.zeros(factor, factor, dtype=torch.float64)
        s[0, 0] = 1.0 / factor
        self.singular = s.repeat(h // factor, w // factor)  # coefficient (bi f + k, bj f + l) of block (bi, bj)

    def forward(self, x):
        return torch.nn.functional.avg_pool2d(x, self.factor)

    def adjoint(self, y):
        f = self.factor
        return y.repeat_interleave(f, -2).repeat_interleave(f, -1) / f**2

    def _blocks(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        f = self.factor
        return x.reshape(b, c, h // f, f, w // f, f)

    def vt(self, x):
        d = self.dct.to(device=x.device, dtype=x.dtype)
        z = torch.einsum("ki,bcpiqj,lj->bcpkql", d, self._blocks(x), d)
        return z.reshape(x.shape)

    def v(self, z):
        d = self.dct.to(device=z.device, dtype=z.dtype)
        x = torch.einsum("ki,bcpkql,lj->bcpiqj", d, self._blocks(z), d)
        return x.reshape(z.shape)

    def ut(self, y):
        b, c, hy, wy = y.shape
        f = self.factor
        z = y.new_zeros(b, c, hy, f, wy, f)
        z[:, :, :, 0, :, 0] = y
        return z.reshape(b, c, hy * f, wy * f)

    def u(self, z):
        return self._blocks(z)[:, :, :, 0, :, 0]

    def measurement_shape(self):
        c, h, w = self.image_shape
        return (c, h // self.factor, w // self.factor)

    def config(self):
        return {"task": self.name, "factor": self.factor}


def periodic_gaussian(n: int, std: float, images: int = 4) -> Tensor:
    """A 1-D Gaussian of ``std`` samples on the circle of n points, periodised (sum over ``images`` shifts each side)
    and normalised to sum 1; its DFT is real and positive (Poisson summation)."""
    d = torch.arange(n, dtype=torch.float64)
    k = sum(torch.exp(-((d + m * n) ** 2) / (2 * std**2)) for m in range(-images, images + 1))
    return k / k.sum()


class Blur(LinearOperator):
    """Circular convolution with a periodised Gaussian kernel of ``std`` pixels, by the FFT."""

    name = "deblur"

    def __init__(self, image_shape: tuple[int, int, int], std: float):
        if not std > 0:
            raise ValueError(f"blur std {std}: expected a positive number of pixels")
        _, h, w = image_shape
        self.image_shape, self.std = tuple(image_shape), float(std)
        kernel = periodic_gaussian(h, std)[:, None] * periodic_gaussian(w, std)[None, :]
        self.kernel = kernel
        self.singular = torch.fft.fft2(kernel).real.clamp(min=0.0)  # real and positive up to round-off

    def _conv(self, x: Tensor) -> Tensor:
        k = self.singular.to(device=x.device, dtype=x.dtype)
        return torch.fft.ifft2(torch.fft.fft2(x) * k).real.to(x.dtype)

    def forward(self, x):
        return self._conv(x)

    def adjoint(self, y):
        return self._conv(y)  # a symmetric kernel: H^T = H

    def vt(self, x):
        return torch.fft.fft2(x, norm="ortho")

    def v(self, z):
        return torch.fft.ifft2(z, norm="ortho").real

    def ut(self, y):
        return torch.fft.fft2(y, norm="ortho")

    def u(self, z):
        return torch.fft.ifft2(z, norm="ortho").real

    def config(self):
        return {"task": self.name, "blur": f"gaussian:{self.std:g}"}


def make_operator(task: str, image_shape: tuple[int, ...], *, mask: Tensor | None = None, factor: int | None = None,
                  blur_std: float | None = None) -> LinearOperator:
    """The operator of ``task`` for images of ``image_shape`` (C, H, W); AccelkitError on inconsistent settings."""
    if len(image_shape) != 3:
        raise AccelkitError(f"restoration works on images (C x H x W); the samples have shape {list(image_shape)}")
    c, h, w = image_shape
    if task == "inpaint":
        if mask is None:
            raise AccelkitError("--task inpaint needs a mask: --mask FILE or a named mask (bottom-half, ...)")
        if mask.ndim != 4 or tuple(mask.shape[-2:]) != (h, w) or mask.shape[1] not in (1, c):
            raise AccelkitError(f"mask of shape {list(mask.shape)} does not match images of shape {[c, h, w]}: "
                                f"expected (H, W) = ({h}, {w}) with 1 or {c} channels")
        return Inpaint(mask.expand(mask.shape[0], c, h, w))
    if task == "super-resolution":
        if factor is None or factor < 2:
            raise AccelkitError(f"--factor {factor}: super-resolution needs an integer factor of at least 2")
        if h % factor or w % factor:
            raise AccelkitError(f"--factor {factor} does not divide the image size {h}x{w}")
        return Downsample((c, h, w), factor)
    if task == "deblur":
        if blur_std is None or not blur_std > 0:
            raise AccelkitError(f"--blur gaussian:{blur_std}: expected a positive standard deviation in pixels")
        return Blur((c, h, w), blur_std)
    if task == "denoise":
        return Identity((c, h, w))
    raise AccelkitError(f"--task {task!r}: expected one of {', '.join(TASKS)}")


__all__ = ["LinearOperator", "Identity", "Inpaint", "Downsample", "Blur", "make_operator", "TASKS", "dct_matrix",
           "periodic_gaussian"]
