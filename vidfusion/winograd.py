"""Winograd F(4x4, 3x3) convolution for the VAE's 3x3 convolutions in float32 CPU inference.

A 3x3 convolution computes 9*C multiply-adds per output value. Winograd's minimal filtering algorithm (Lavin &
Gray, "Fast Algorithms for Convolutional Neural Networks", 2016) takes 6x6 input tiles d to a transformed domain
(B^T d B), multiplies them there by the transformed kernel (G g G^T) and maps the product back (A^T m A), giving a
4x4 output tile from 36 products per channel pair instead of 144: 4x fewer multiplies. The products are 36
independent GEMMs (tiles x C) @ (C x C'), which run near the CPU's peak; the transforms are small matrix products
over whole blocks of tiles. Error: about 1e-5 relative to the output's largest value in float32 (a direct float32
convolution is about 2e-6 off a float64 one), so the path is used only for float32 CPU inference of the VAE, whose
output is quantised to 8 bits, never for the UNet, whose errors would compound over the sampling steps.

Where it pays (measured on AMD EPYC Zen 4, 2 cores, against oneDNN's direct convolution): many channels and many
output pixels per call (one frame: 512 ch at 32x32 1.7x, 512->256 ch at 64x64 1.5x, 128 ch at 128x128 1.2x; 8
frames of 512 ch at 16x16 1.6x, one such frame 0.9x; 64 ch at 40x40 0.4x), so a convolution takes this path only
from MIN_PIXELS output pixels per call and MIN_CHANNELS channels up. Disable with VIDFUSION_WINOGRAD=0.
"""

from __future__ import annotations

import os
import threading

import torch
from torch import nn

# F(4x4, 3x3) with interpolation points 0, 1, -1, 2, -2, inf (Lavin & Gray, eq. 11-13)
BT = torch.tensor([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                   [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=torch.float64)
G = torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=torch.float64)
AT = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
                  dtype=torch.float64)
TILE, ALPHA = 4, 6  # output tile side, input tile side
BT32, AT32 = BT.float(), AT.float()
KERNEL_TRANSFORM = torch.kron(G, G).float()  # (36, 9): vec(G g G^T) = (G kron G) vec(g)

MIN_PIXELS = 32 * 32  # output pixels per call (frames x H x W) from which the transforms pay for themselves
MIN_CHANNELS = 128  # below this the 36 products are too small to run at speed (64 ch at 40x40: 0.4x)
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


def transform_kernels(weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(C', C, 3, 3) -> (36, C, C') view of a (C', 36, C) tensor: G g G^T of every kernel, per tile position the
    (C x C') matrix that the transformed input tiles are multiplied by."""
    c_out, c_in = weight.shape[:2]
    w = weight.detach().float().permute(0, 2, 3, 1).reshape(c_out, 9, c_in)  # no copy for channels-last weights
    kernels = torch.matmul(KERNEL_TRANSFORM, w, out=out.view(c_out, ALPHA * ALPHA, c_in) if out is not None else None)
    return kernels.permute(1, 2, 0)  # (36, C, C')


def conv3x3(x: torch.Tensor, kernels: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """3x3 convolution, stride 1, zero padding 1. x (N, H, W, C) contiguous float32 with H and W multiples of 4,
    kernels from transform_kernels -> (N, H, W, C'). Processed in blocks of tile rows."""
    n, h, w, c = x.shape
    c_out = kernels.shape[2]
    tiles_h, tiles_w = h // TILE, w // TILE
    out = x.new_empty(n, h, w, c_out)
    out_tiles = out.view(n, tiles_h, TILE, tiles_w, TILE, c_out)
    rows = max(1, min(tiles_h, CHUNK_BYTES // (ALPHA * ALPHA * n * tiles_w * c * 4)))
    block_tiles = n * rows * tiles_w
    padded = _workspace("padded", n * (rows * TILE + 2) * (w + 2) * c).view(n, rows * TILE + 2, w + 2, c)
    padded.zero_()  # one block of input rows with its zero border
    gathered = _workspace("gathered", ALPHA * ALPHA * block_tiles * c)
    transformed = _workspace("transformed", ALPHA * ALPHA * block_tiles * c)
    products = _workspace("products", ALPHA * ALPHA * block_tiles * c_out)
    half = _workspace("half", ALPHA * ALPHA * block_tiles * max(c, c_out))  # one of two transform passes done
    spatial = _workspace("spatial", TILE * TILE * block_tiles * c_out)
    for r0 in range(0, tiles_h, rows):
        nr = min(rows, tiles_h - r0)
        top, bottom = r0 * TILE - 1, (r0 + nr) * TILE + 1  # input rows this block reads
        src = x[:, max(top, 0):min(bottom, h)]  # only the first block starts on the zero row above the image
        padded[:, max(top, 0) - top:max(top, 0) - top + src.shape[1], 1:w + 1].copy_(src)
        if bottom > h:  # the last block reads the zero rows below the image
            padded[:, h - top:].zero_()
        s_n, s_h, s_w, _ = padded.stride()
        tiles = nr * tiles_w * n
        d = gathered[:ALPHA * ALPHA * tiles * c].view(ALPHA, ALPHA, n, nr, tiles_w, c)  # 6x6 input tiles
        d.copy_(padded.as_strided(d.shape, (s_h, s_w, s_n, TILE * s_h, TILE * s_w, 1)))
        v = transformed[:ALPHA * ALPHA * tiles * c]
        _separable(BT32, d.view(ALPHA, ALPHA, -1), half, v)  # B^T d B: (36, tiles*C)
        m = products[:ALPHA * ALPHA * tiles * c_out].view(ALPHA * ALPHA, tiles, c_out)
        torch.bmm(v.view(ALPHA * ALPHA, tiles, c), kernels, out=m)  # (36, tiles, C')
        y = spatial[:TILE * TILE * tiles * c_out]
        _separable(AT32, m.view(ALPHA, ALPHA, -1), half, y)  # A^T m A: (16, tiles*C')
        y = y.view(TILE, TILE, n, nr, tiles_w, c_out).permute(2, 3, 0, 4, 1, 5)  # (N, nr, 4, Tw, 4, C')
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
    """nn.Conv2d (3x3, stride 1, padding 1) that takes the Winograd path in float32 CPU inference on maps of at least
    MIN_PIXELS pixels with sides divisible by 4; the plain convolution everywhere else. Same parameters and keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if not (ENABLED and x.device.type == "cpu" and x.dtype == torch.float32 and n * h * w >= MIN_PIXELS
                and min(c, self.out_channels) >= MIN_CHANNELS and h % TILE == 0 and w % TILE == 0
                and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):
            return super().forward(x)
        nhwc = x.permute(0, 2, 3, 1)
        if not nhwc.is_contiguous():
            nhwc = nhwc.contiguous()
        return conv3x3(nhwc, self.kernels(), self.bias).permute(0, 3, 1, 2)  # channels-last NCHW view

    def _apply(self, fn, recurse=True):  # .to() / .half() / .cuda(): drop the kept kernels with the old weight
        self._kernels = None
        return super()._apply(fn, recurse)

    def kernels(self) -> torch.Tensor:
        """The transformed kernels: kept when small, otherwise made per call in a reused buffer (4x the weight)."""
        key = (self.weight.data_ptr(), self.weight._version)
        cached = getattr(self, "_kernels", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        numel = ALPHA * ALPHA * self.weight.shape[0] * self.weight.shape[1]
        if numel * 4 > CACHE_KERNEL_BYTES:
            return transform_kernels(self.weight, _workspace("kernels", numel))
        kernels = transform_kernels(self.weight)
        self._kernels = (key, kernels)
        return kernels

