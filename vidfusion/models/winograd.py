"""Winograd convolutions for 3x3 convolutions in float32 CPU inference: F(4x4, 3x3) for the VAE, F(2x2, 3x3)
for the UNet.

A 3x3 convolution computes 9*C multiply-adds per output value. Winograd's minimal filtering algorithm (Lavin &
Gray, "Fast Algorithms for Convolutional Neural Networks", 2016) takes input tiles d to a transformed domain
(B^T d B), multiplies them there by the transformed kernel (G g G^T) and maps the product back (A^T m A).
F(4x4, 3x3): 6x6 tiles, 36 products per 4x4 output tile instead of 144 (4x fewer multiplies), error about 1e-5
relative to the output's largest value (a direct float32 convolution is about 2e-6 off a float64 one): used for
the VAE, whose output is quantised to 8 bits. F(2x2, 3x3): 4x4 tiles, 16 products per 2x2 tile instead of 36
(2.25x fewer), transforms of 0, +-1 and 1/2 only: error about 3e-7, below the direct convolution's, so the UNet
uses it without its errors growing over the sampling steps. The products are independent GEMMs
(tiles x C) @ (C x C'), which run near the CPU's peak; the transforms are small matrix products over whole blocks
of tiles.

Where it pays (AMD EPYC Zen 4, 2 cores, against oneDNN's direct convolution) is a question of channels and output
pixels per call. F(4x4): one frame of 512 ch at 32x32 1.7x, 512->256 ch at 64x64 1.5x, 128 ch at 128x128 1.2x; 64
ch at 40x40 0.4x: from MIN_PIXELS pixels and MIN_CHANNELS channels up. F(2x2), 32 frames (16 with CFG): 320 ch at
32x32 1.2x, 640 ch at 16x16 1.3x, 1280 ch at 8x8 1.6x, at 4x4 2.3x; 128 ch 0.7x, 256 ch ~1.0x: from
F2_MIN_CHANNELS channels up, and F2_MIN_PIXELS pixels where the kernels are transformed per call. The rule is by
shape, never by timing, so the same input gives the same output on every run. Disable with VIDFUSION_WINOGRAD=0.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Variant:
    """One Winograd algorithm F(m x m, 3x3): input tiles of side alpha = m + 2 give output tiles of side m."""

    bt: torch.Tensor  # (alpha, alpha) input transform B^T
    at: torch.Tensor  # (m, alpha) output transform A^T
    kernel_transform: torch.Tensor  # (alpha^2, 9): vec(G g G^T) = (G kron G) vec(g)
    tile: int
    alpha: int


def _variant(bt: list, g: list, at: list) -> Variant:
    g64 = torch.tensor(g, dtype=torch.float64)
    at32 = torch.tensor(at, dtype=torch.float32)
    return Variant(torch.tensor(bt, dtype=torch.float32), at32, torch.kron(g64, g64).float(), *at32.shape)


# F(4x4, 3x3) with interpolation points 0, 1, -1, 2, -2, inf (Lavin & Gray, eq. 11-13): 36 products per 16 outputs
F4 = _variant([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
               [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
              [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
              [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]])
# F(2x2, 3x3) with points 0, 1, -1, inf (Lavin & Gray, eq. 7-8): 16 products per 4 outputs, transforms of 0/+-1/0.5
F2 = _variant([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
              [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
              [[1, 1, 1, 0], [0, 1, -1, -1]])

MIN_PIXELS = 32 * 32  # F(4x4): output pixels per call (frames x H x W) from which the transforms pay for themselves
MIN_CHANNELS = 128  # F(4x4): below this the 36 products are too small to run at speed (64 ch at 40x40: 0.4x)
F2_MIN_CHANNELS = 320  # F(2x2): 256 ch gains 0-10%, 128 ch loses 30%
F2_MIN_PIXELS = 32 * 32  # F(2x2) with kernels transformed per call (not kept): 640 ch at 16x4x4 0.9x, 16x8x8 1.2x
CHUNK_BYTES = 8 << 20  # transformed input per block of tile rows: stays in the last-level cache
CACHE_KERNEL_BYTES = 20 << 20  # transformed kernels up to this size (C*C' <= 512*256) are kept; larger: per call
ENABLED = os.environ.get("VIDFUSION_WINOGRAD", "1") != "0"


_scratch = threading.local()


def _workspace(name: str, numel: int) -> torch.Tensor:
    """A per-thread float32 buffer reused across calls: fresh multi-MB allocations page-fault on every call."""
    buffer = getattr(_scratch, name, None)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(numel)
        setattr(_scratch, name, buffer)
    return buffer[:numel]


def transform_kernels(weight: torch.Tensor, variant: Variant = F4, out: torch.Tensor | None = None) -> torch.Tensor:
    """(C', C, 3, 3) -> (alpha^2, C, C') view of a (C', alpha^2, C) tensor: G g G^T of every kernel, per tile
    position the (C x C') matrix that the transformed input tiles are multiplied by."""
    c_out, c_in = weight.shape[:2]
    positions = variant.alpha * variant.alpha
    w = weight.detach().float().permute(0, 2, 3, 1).reshape(c_out, 9, c_in)  # no copy for channels-last weights
    kernels = torch.matmul(variant.kernel_transform, w,
                           out=out.view(c_out, positions, c_in) if out is not None else None)
    return kernels.permute(1, 2, 0)  # (alpha^2, C, C')


def conv3x3(x: torch.Tensor, kernels: torch.Tensor, bias: torch.Tensor | None, variant: Variant = F4) -> torch.Tensor:
    """3x3 convolution, stride 1, zero padding 1. x (N, H, W, C) contiguous float32 with H and W multiples of the
    variant's tile, kernels from transform_kernels -> (N, H, W, C'). Processed in blocks of tile rows."""
    n, h, w, c = x.shape
    c_out = kernels.shape[2]
    tile, alpha = variant.tile, variant.alpha
    positions = alpha * alpha
    tiles_h, tiles_w = h // tile, w // tile
    out = x.new_empty(n, h, w, c_out)
    out_tiles = out.view(n, tiles_h, tile, tiles_w, tile, c_out)
    rows = max(1, min(tiles_h, CHUNK_BYTES // (positions * n * tiles_w * c * 4)))
    block_tiles = n * rows * tiles_w
    padded = _workspace("padded", n * (rows * tile + 2) * (w + 2) * c).view(n, rows * tile + 2, w + 2, c)
    padded.zero_()  # one block of input rows with its zero border
    gathered = _workspace("gathered", positions * block_tiles * c)
    transformed = _workspace("transformed", positions * block_tiles * c)
    products = _workspace("products", positions * block_tiles * c_out)
    half = _workspace("half", positions * block_tiles * max(c, c_out))  # one of two transform passes done
    spatial = _workspace("spatial", tile * tile * block_tiles * c_out)
    for r0 in range(0, tiles_h, rows):
        nr = min(rows, tiles_h - r0)
        top, bottom = r0 * tile - 1, (r0 + nr) * tile + 1  # input rows this block reads
        src = x[:, max(top, 0):min(bottom, h)]  # only the first block starts on the zero row above the image
        padded[:, max(top, 0) - top:max(top, 0) - top + src.shape[1], 1:w + 1].copy_(src)
        if bottom > h:  # the last block reads the zero rows below the image
            padded[:, h - top:].zero_()
        s_n, s_h, s_w, _ = padded.stride()
        tiles = nr * tiles_w * n
        d = gathered[:positions * tiles * c].view(alpha, alpha, n, nr, tiles_w, c)  # input tiles
        d.copy_(padded.as_strided(d.shape, (s_h, s_w, s_n, tile * s_h, tile * s_w, 1)))
        v = transformed[:positions * tiles * c]
        _separable(variant.bt, d.view(alpha, alpha, -1), half, v)  # B^T d B: (alpha^2, tiles*C)
        m = products[:positions * tiles * c_out].view(positions, tiles, c_out)
        torch.bmm(v.view(positions, tiles, c), kernels, out=m)  # (alpha^2, tiles, C')
        y = spatial[:tile * tile * tiles * c_out]
        _separable(variant.at, m.view(alpha, alpha, -1), half, y)  # A^T m A: (tile^2, tiles*C')
        y = y.view(tile, tile, n, nr, tiles_w, c_out).permute(2, 3, 0, 4, 1, 5)  # (N, nr, tile, Tw, tile, C')
        target = out_tiles[:, r0:r0 + nr]
        if bias is None:
            target.copy_(y)
        else:
            torch.add(y, bias, out=target)
    return out


def _separable(transform: torch.Tensor, x: torch.Tensor, scratch: torch.Tensor, out: torch.Tensor) -> None:
    """out[a, b] = sum_ij T[a, i] x[i, j] T[b, j] for x (k, k, L), T (t, k): two small matrix products (6x fewer
    operations than one with the Kronecker product T kron T)."""
    t, k = transform.shape
    rows = scratch[:t * k * x.shape[-1]].view(t, k * x.shape[-1])
    torch.mm(transform, x.view(k, -1), out=rows)  # (t, k*L)
    torch.matmul(transform, rows.view(t, k, -1), out=out.view(t, t, -1))  # (t, t, L)


class WinogradConv2d(nn.Conv2d):
    """nn.Conv2d (3x3, stride 1, padding 1) that takes the Winograd F(4x4, 3x3) path in float32 CPU inference where
    it pays (`pays`) and the sides are multiples of the tile; the plain convolution everywhere else. Same
    parameters and keys."""

    variant = F4

    def pays(self, n: int, c: int, h: int, w: int) -> bool:
        return n * h * w >= MIN_PIXELS and min(c, self.out_channels) >= MIN_CHANNELS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        tile = self.variant.tile
        if not (ENABLED and x.device.type == "cpu" and x.dtype == torch.float32 and h % tile == 0
                and w % tile == 0 and self.pays(n, c, h, w) and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):
            return super().forward(x)
        nhwc = x.permute(0, 2, 3, 1)
        if not nhwc.is_contiguous():
            nhwc = nhwc.contiguous()
        return conv3x3(nhwc, self.kernels(), self.bias, self.variant).permute(0, 3, 1, 2)  # channels-last NCHW view

    def _apply(self, fn, recurse=True):  # .to() / .half() / .cuda(): drop the kept kernels with the old weight
        self._kernels = None
        return super()._apply(fn, recurse)

    def keeps_kernels(self) -> bool:
        """Whether the transformed kernels (alpha^2/9 times the weight) are small enough to be kept."""
        return self.variant.alpha ** 2 * self.weight.shape[0] * self.weight.shape[1] * 4 <= CACHE_KERNEL_BYTES

    def kernels(self) -> torch.Tensor:
        """The transformed kernels: kept when small, otherwise made per call in a reused buffer."""
        key = (self.weight.data_ptr(), self.weight._version)
        cached = getattr(self, "_kernels", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        if not self.keeps_kernels():
            numel = self.variant.alpha ** 2 * self.weight.shape[0] * self.weight.shape[1]
            return transform_kernels(self.weight, self.variant, _workspace("kernels", numel))
        kernels = transform_kernels(self.weight, self.variant)
        self._kernels = (key, kernels)
        return kernels


class WinogradF2Conv2d(WinogradConv2d):
    """The UNet's 3x3 convolutions: Winograd F(2x2, 3x3) (error below the direct convolution's) from
    F2_MIN_CHANNELS channels up, and from F2_MIN_PIXELS output pixels where the kernels are not kept."""

    variant = F2

    def pays(self, n: int, c: int, h: int, w: int) -> bool:
        return min(c, self.out_channels) >= F2_MIN_CHANNELS and (self.keeps_kernels() or n * h * w >= F2_MIN_PIXELS)
