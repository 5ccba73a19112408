"""Blocks shared by the UNet3D and the VAE, on channels-last tensors.

Every activation is stored as (..., H, W, C): the UNet keeps video as (B, F, H, W, C) and the VAE keeps
frames as (N, H, W, C). Convolutions see a channels-last NCHW *view*, linear layers act on C directly,
so spatial and temporal layers never shuffle memory between them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# The fused SDPA kernels fail for batch >= 65536 on CUDA (pytorch/pytorch#142228); stay below it.
SDPA_MAX_BATCH = 32768
FF_CHUNK_BYTES = 8 << 20  # CPU feed-forward: the largest GEGLU activation per chunk of tokens


def _onednn_linear_works() -> bool:
    # an internal op (inductor's CPU linear): check once that this torch build has it and computes F.linear
    try:
        x, w, b = torch.ones(2, 3), torch.ones(4, 3), torch.ones(4)
        return torch.equal(torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""), F.linear(x, w, b))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


ONEDNN = torch.backends.mkldnn.is_available() and _onednn_linear_works()


class Linear(nn.Linear):
    """nn.Linear whose float32 CPU inference goes through oneDNN's matmul with the bias fused: 2-2.7x faster than
    the MKL sgemm behind F.linear on the AMD EPYC machines measured (MKL takes a generic path there). Same
    parameters and state-dict keys; F.linear everywhere else (GPU, half precision, autograd, and under
    torch.compile, whose lowering of that op wants its own prepacked weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.float32 and ONEDNN
                and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def use_channels_last_weights(model: nn.Module) -> nn.Module:
    """Store conv weights channels-last so convolutions on channels-last activations do not re-layout them
    on every call (a large cost on CPU). Conv3d (3,1,1) weights get the layout whose (3,1) view is NHWC."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
        elif isinstance(module, nn.Conv3d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last_3d)
    return model


def conv_cl(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Apply a Conv2d to a channels-last tensor (..., H, W, C) and return (..., H', W', C')."""
    lead, (h, w, c) = x.shape[:-3], x.shape[-3:]
    y = conv(x.reshape(-1, h, w, c).permute(0, 3, 1, 2))  # (N, C', H', W') channels-last view
    return y.permute(0, 2, 3, 1).reshape(*lead, *y.shape[-2:], y.shape[1])


def group_norm_cl(norm: nn.GroupNorm, x: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """GroupNorm of a channels-last tensor; statistics per index of the first `batch_dims` dims."""
    n = math.prod(x.shape[:batch_dims])
    c = x.shape[-1]
    if not keeps_channels_last(x.device):
        return group_norm_channels_last(x.reshape(n, -1, c), norm.num_groups, norm.weight, norm.bias,
                                        norm.eps).view(x.shape)
    y = F.group_norm(x.reshape(n, -1, 1, c).permute(0, 3, 1, 2), norm.num_groups, norm.weight, norm.bias, norm.eps)
    return y.permute(0, 2, 3, 1).reshape(x.shape)


def keeps_channels_last(device: torch.device) -> bool:
    """Whether torch's GroupNorm kernel works on channels-last input in place. Off the CPU, F.group_norm makes the
    input NCHW-contiguous and returns NCHW (aten group_norm.cpp; so in torch 2.11, the GPU machines' version, and
    until an NHWC CUDA kernel such as pytorch#191945 ships): two full copies per norm, plus a re-layout later."""
    return device.type == "cpu"


def group_norm_channels_last(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor,
                             eps: float) -> torch.Tensor:
    """GroupNorm of x (N, L, C) over (L, C/groups), without changing the layout: statistics in float32, then one
    fused pass y = x * scale + shift with per-(N, C) float32 scale and shift, written in x's dtype."""
    n, length, c = x.shape
    grouped = x.reshape(n, length, groups, c // groups)
    if x.dtype == torch.float32:
        var, mean = torch.var_mean(grouped, dim=(1, 3), correction=0)  # (N, G)
    else:  # float32 accumulation without a float32 copy of x
        count = length * (c // groups)
        mean = grouped.sum(dim=(1, 3), dtype=torch.float32) / count
        mean_sq = torch.linalg.vector_norm(grouped, dim=(1, 3), dtype=torch.float32).square() / count
        var = (mean_sq - mean.square()).clamp_min(0)
    scale = torch.rsqrt(var + eps).unsqueeze(-1) * weight.float().view(groups, -1)  # (N, G, C/G)
    shift = bias.float().view(groups, -1) - mean.unsqueeze(-1) * scale
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):  # training: autograd has no out=
        return torch.addcmul(shift.view(n, 1, c), x, scale.view(n, 1, c)).to(x.dtype)
    out = torch.empty_like(x)
    return torch.addcmul(shift.view(n, 1, c), x, scale.view(n, 1, c), out=out)


def group_norm_silu(norm: nn.GroupNorm, x: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """silu(GroupNorm(x)) with the activation applied in place: one fresh full-size tensor instead of two."""
    return F.silu(group_norm_cl(norm, x, batch_dims), inplace=True)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention over dim 1. q (N, L, [P,] heads*d), k/v (N, S, [P,] heads*d) -> q's shape.
    With P, each of the P positions is its own sequence (temporal attention over frames at every pixel of a
    (B, F, H*W, C) tensor): the positions become extra heads of a strided view, so nothing is transposed."""
    shape = q.shape
    if q.dim() == 3:
        q, k, v = q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2)
    n, length, positions, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(n, t.shape[1], -1, d).transpose(1, 2) for t in (q, k, v))  # (N, P*heads, L, d)
    if n <= SDPA_MAX_BATCH and q.shape[1] <= SDPA_MAX_BATCH:
        out = F.scaled_dot_product_attention(q, k, v)
    else:  # both grid dims of the fused kernels are limited
        out = torch.cat([
            torch.cat([F.scaled_dot_product_attention(qh, kh, vh) for qh, kh, vh in
                       zip(qn.split(SDPA_MAX_BATCH, 1), kn.split(SDPA_MAX_BATCH, 1), vn.split(SDPA_MAX_BATCH, 1))],
                      dim=1)
            for qn, kn, vn in zip(q.split(SDPA_MAX_BATCH), k.split(SDPA_MAX_BATCH), v.split(SDPA_MAX_BATCH))
        ])
    return out.transpose(1, 2).reshape(shape)


# The text's (keys, values) for every cross-attention of a model, in the order of their owners' `kv_index`.
TextKV = tuple[tuple[torch.Tensor, torch.Tensor], ...]


class Attention(nn.Module):
    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None, bias: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = Linear(query_dim, inner, bias=bias)
        self.to_k = Linear(context_dim or query_dim, inner, bias=bias)
        self.to_v = Linear(context_dim or query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([Linear(inner, query_dim)])

    def kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.to_k(context), self.to_v(context)

    def forward(self, x: torch.Tensor,
                context: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        # x (N, L, [P,] C); context (N, S, Cc), its precomputed (keys, values), or None for self-attention
        k, v = context if isinstance(context, tuple) else self.kv(x if context is None else context)
        return self.to_out[0](attention(self.to_q(x), k, v, self.heads))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return F.gelu(gate).mul_(hidden)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # net.0 = GEGLU, net.1 = dropout (no weights), net.2 = output projection: the checkpoint's key layout
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # On CPU, tokens in chunks whose (tokens, 2 * inner) GEGLU activation stays within FF_CHUNK_BYTES: larger
        # fresh tensors are memory-mapped by malloc and page-fault on every call (the 1.7B UNet's first level in
        # bf16: 84 MB per call, ~80 ms of faults each), smaller ones reuse heap memory. Rows are independent.
        rows, dim = x.numel() // x.shape[-1], x.shape[-1]
        chunk = max(1, FF_CHUNK_BYTES // (self.net[0].proj.out_features * x.element_size()))
        if rows <= chunk or x.device.type != "cpu" or torch.is_grad_enabled():
            return self.net[2](self.net[0](x))
        flat = x.reshape(rows, dim)
        out = flat.new_empty(rows, self.net[2].out_features)
        for start in range(0, rows, chunk):
            out[start:start + chunk] = self.net[2](self.net[0](flat[start:start + chunk]))
        return out.view(*x.shape[:-1], -1)


class TransformerBlock(nn.Module):
    """Self-attention, then cross-attention to text (or a second self-attention), then a GEGLU MLP."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None):
        super().__init__()
        self.cross = context_dim is not None
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim_head, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor,
                context: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        # x (N, L, [P,] D). With cross-attention, context is the text (B, S, Dc) or this block's (keys, values) of
        # it, where N = B * frames: all frames of one video attend to the same text, so they form one long query
        # sequence (no per-frame copies of the text). A per-frame text has B = N.
        x = x + self.attn1(self.norm1(x))
        h = self.norm2(x)
        if self.cross:
            n, length, dim = h.shape
            batch = (context[0] if isinstance(context, tuple) else context).shape[0]
            h = self.attn2(h.reshape(batch, -1, dim), context).reshape(n, length, dim)
        else:
            h = self.attn2(h)
        x = x + h
        return x + self.ff(self.norm3(x))


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, groups: int, eps: float,
                 output_scale_factor: float = 1.0, conv3x3: type[nn.Conv2d] = nn.Conv2d):
        super().__init__()
        self.output_scale_factor = output_scale_factor
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = conv3x3(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = conv3x3(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor | None = None) -> torch.Tensor:
        # x (B, [F,] H, W, C); temb_act = silu(time embedding), (B, Ct): one per video, broadcast over frames
        batch_dims = x.dim() - 3
        h = conv_cl(self.conv1, group_norm_silu(self.norm1, x, batch_dims))
        if self.time_emb_proj is not None:
            t = self.time_emb_proj(temb_act)
            h = h.add_(t.view(t.shape[0], *([1] * (h.dim() - 2)), t.shape[-1]))
        h = conv_cl(self.conv2, group_norm_silu(self.norm2, h, batch_dims))
        if self.conv_shortcut is not None:
            x = conv_cl(self.conv_shortcut, x)
        out = h.add_(x)  # h is this block's own tensor
        return out if self.output_scale_factor == 1.0 else out.div_(self.output_scale_factor)


class Downsample(nn.Module):
    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:  # the VAE pads right/bottom only
            x = F.pad(x, (0, 0, 0, 1, 0, 1))
        return conv_cl(self.conv, x)


def _fold_phases(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Along one 3-tap kernel dim: the 2-tap kernels that a 3-tap conv applies to a 2x nearest-upsampled input,
    for even (taps on rows i-1, i) and odd (rows i, i+1) output positions."""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)


def upsample_conv_kernels(weight: torch.Tensor) -> torch.Tensor:
    """3x3 conv after 2x nearest upsampling == four 2x2 convs on the input, one per output phase (a, b):
    (C', C, 3, 3) -> (4 * C', C, 2, 2), phases in the order (0,0), (0,1), (1,0), (1,1). 16 taps instead of 36."""
    w = weight.float()
    phases = [col for row in _fold_phases(w, 2) for col in _fold_phases(row, 3)]
    return torch.cat(phases).to(weight.dtype)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        # set by fuse_upsample_convs() after loading: the four phase kernels, used for exact 2x upsampling
        self.register_buffer("phase_weight", None, persistent=False)
        self.register_buffer("phase_bias", None, persistent=False)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        lead, (h, w, c) = x.shape[:-3], x.shape[-3:]
        if self.phase_weight is not None and (size is None or tuple(size) == (2 * h, 2 * w)):
            return self._phased(x)
        size = size or (2 * h, 2 * w)
        y = F.interpolate(x.reshape(-1, h, w, c).permute(0, 3, 1, 2), size=size, mode="nearest")
        y = y.permute(0, 2, 3, 1).reshape(*lead, *size, c)
        return conv_cl(self.conv, y)

    def _phased(self, x: torch.Tensor) -> torch.Tensor:
        # one 2x2 conv with 4x the output channels over the zero-padded input; phase (a, b) of output pixel
        # (2i+a, 2j+b) is that conv's channel block ab at (i+a, j+b). No upsampled copy of the input is made.
        lead, (h, w, c) = x.shape[:-3], x.shape[-3:]
        padded = F.pad(x.reshape(-1, h, w, c), (0, 0, 1, 1, 1, 1))  # (N, h+2, w+2, C)
        y = F.conv2d(padded.permute(0, 3, 1, 2), self.phase_weight, self.phase_bias)  # (N, 4C', h+1, w+1) cl view
        y = y.permute(0, 2, 3, 1).unflatten(-1, (2, 2, -1))  # (N, h+1, w+1, a, b, C')
        out = y.new_empty(y.shape[0], h, 2, w, 2, y.shape[-1])
        for a in (0, 1):
            for b in (0, 1):
                out[:, :, a, :, b] = y[:, a:a + h, b:b + w, a, b]
        return out.reshape(*lead, 2 * h, 2 * w, y.shape[-1])


def fuse_upsample_convs(model: nn.Module) -> nn.Module:
    """Give every Upsample its phase kernels (computed once, in float32, from the loaded 3x3 weights)."""
    for module in model.modules():
        if isinstance(module, Upsample):
            weight = upsample_conv_kernels(module.conv.weight.data)
            module.phase_weight = weight.contiguous(memory_format=torch.channels_last)
            module.phase_bias = module.conv.bias.data.repeat(4)
    return model


def fourier_filter(x: torch.Tensor, scale: float, threshold: int = 1) -> torch.Tensor:
    """FreeU's skip filter: scale the lowest spatial frequencies (a 2*threshold square around DC in the
    fft-shifted spectrum) of x (..., H, W, C) by `scale`. Computed in float32."""
    h, w = x.shape[-3], x.shape[-2]
    freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-3, -2)), dim=(-3, -2))
    mask = torch.ones(h, w, 1, device=x.device)
    mask[h // 2 - threshold:h // 2 + threshold, w // 2 - threshold:w // 2 + threshold] = scale
    freq = torch.fft.ifftshift(freq * mask, dim=(-3, -2))
    return torch.fft.ifftn(freq, dim=(-3, -2)).real.to(x.dtype)


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding, cos first (flip_sin_to_cos=True, shift 0). timesteps (B,) -> (B, dim) float32."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Embedding of a guidance scale for guidance-distilled UNets (LCM, T2V-Turbo): sin first, then cos, of
    w * 1000 at frequencies 10000^(-i / (dim/2 - 1)). w (B,) -> (B, dim) float32."""
    half = dim // 2
    exponent = -math.log(10000.0) / (half - 1) * torch.arange(half, dtype=torch.float32, device=w.device)
    args = (w.float() * 1000.0)[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    """linear_2(silu(linear_1(x [+ cond_proj(condition)]))). cond_proj (no bias) exists for guidance-distilled
    UNets (diffusers' time_cond_proj_dim); it is registered between linear_1 and linear_2, as in diffusers."""

    def __init__(self, in_dim: int, out_dim: int, cond_dim: int | None = None):
        super().__init__()
        self.linear_1 = Linear(in_dim, out_dim)
        self.cond_proj = Linear(cond_dim, in_dim, bias=False) if cond_dim else None
        self.linear_2 = Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None and self.cond_proj is not None:
            x = x + self.cond_proj(condition.to(x.dtype))
        return self.linear_2(F.silu(self.linear_1(x)))
