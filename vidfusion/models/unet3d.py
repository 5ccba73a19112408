"""The ModelScope / VideoFusion UNet3D (diffusers' UNet3DConditionModel weights), channels-last video."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .config import UNetConfig
from .layers import (
    Downsample,
    Linear,
    ResnetBlock,
    TextKV,
    TimestepEmbedding,
    TransformerBlock,
    Upsample,
    conv_cl,
    fourier_filter,
    group_norm_cl,
    group_norm_silu,
    timestep_embedding,
)
from .winograd import WinogradF2Conv2d


@dataclass
class FeatureCache:
    """Features one UNet step keeps for the next ones (step_cache.py decides which steps are full).
    DeepCache (`branch` = a skip index, 0 = transformer_in's output): the hidden state entering the up layer that
    consumes skip `branch`; a cached step computes only skips 0..branch and the up layers from there on.
    Faster Diffusion (`branch` None): the encoder's skips and the mid block's output; a cached step runs the
    decoder only. `reuse` False: a full step that fills the cache."""

    branch: int | None
    reuse: bool = False
    hidden: torch.Tensor | None = None  # (B, F, H, W, C)
    skips: list[torch.Tensor] | None = None


class TemporalConvLayer(nn.Module):
    """Four (GroupNorm, SiLU, Conv3d (3,1,1)) stages over frames, with a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()

        def stage(dropout: bool) -> nn.Sequential:
            layers = [nn.GroupNorm(groups, channels), nn.SiLU()]
            layers += [nn.Dropout(0.1)] if dropout else []
            return nn.Sequential(*layers, nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0)))

        self.conv1 = stage(False)
        self.conv2 = stage(True)
        self.conv3 = stage(True)
        self.conv4 = stage(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (B, F, H, W, C). A (3,1,1) conv is a (3,1) conv2d over the (F, H*W) plane of a channels-last view.
        b, f, h, w, c = x.shape
        y = x
        for seq in (self.conv1, self.conv2, self.conv3, self.conv4):
            norm, conv = seq[0], seq[-1]
            y = group_norm_silu(norm, y, batch_dims=1)  # statistics over (F, H, W) per video
            if self.training and isinstance(seq[2], nn.Dropout) and seq[2].p > 0:
                y = _dropout_as_diffusers(y, seq[2].p)
            y = F.conv2d(y.view(b, f, h * w, c).permute(0, 3, 1, 2), conv.weight.squeeze(-1), conv.bias, padding=(1, 0))
            y = y.permute(0, 2, 3, 1).reshape(b, f, h, w, c)
        return x + y


def _dropout_as_diffusers(y: torch.Tensor, p: float) -> torch.Tensor:
    """nn.Dropout in training on y (B, F, H, W, C), with the mask drawn in diffusers' (B, C, F, H, W) order (as its
    TemporalConvLayer applies it), so the same seed drops the same values."""
    b, f, h, w, c = y.shape
    keep = torch.empty((b, c, f, h, w), device=y.device, dtype=y.dtype).bernoulli_(1 - p).div_(1 - p)
    return y * keep.permute(0, 2, 3, 4, 1)


class TransformerTemporal(nn.Module):
    """Self-attention across frames at every pixel (two self-attentions + MLP), with a residual."""

    def __init__(self, channels: int, heads: int, dim_head: int, groups: int):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(inner, heads, dim_head, None)])
        self.proj_out = Linear(inner, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (B, F, H, W, C); attention runs over F for each pixel on a strided (B, F, H*W, inner) view: no permutes
        b, f, h, w, c = x.shape
        y = self.proj_in(group_norm_cl(self.norm, x, batch_dims=1).view(b, f, h * w, c))  # (B, F, H*W, inner)
        for block in self.transformer_blocks:
            y = block(y)
        return x + self.proj_out(y).view(b, f, h, w, c)


class Transformer2D(nn.Module):
    """Per-frame spatial self-attention and cross-attention to the text, with a residual."""

    def __init__(self, channels: int, heads: int, dim_head: int, context_dim: int, groups: int):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(inner, heads, dim_head, context_dim)])
        self.proj_out = Linear(inner, channels)
        self.kv_index = 0  # its entry in the UNet's TextKV

    def text(self, context: torch.Tensor | TextKV) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """What this layer attends to: the text itself, or its own (keys, values) out of the UNet's TextKV."""
        return context if isinstance(context, torch.Tensor) else context[self.kv_index]

    def forward(self, x: torch.Tensor, context: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, f, h, w, c = x.shape
        y = self.proj_in(group_norm_cl(self.norm, x, batch_dims=2).reshape(b * f, h * w, c))
        for block in self.transformer_blocks:
            y = block(y, context)
        return x + self.proj_out(y).view(b, f, h, w, c)


class Block3D(nn.Module):
    """A down or up block: (resnet, temporal conv[, spatial attention, temporal attention]) × layers."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, layers: int, cfg: UNetConfig,
                 head_dim: int | None, skip_channels: tuple[int, ...] = (), prev_channels: int | None = None):
        super().__init__()
        groups, eps = cfg.norm_num_groups, cfg.norm_eps
        resnets, temp_convs, attentions, temp_attentions = [], [], [], []
        for i in range(layers):
            if skip_channels:  # up block: input is the previous output concatenated with a skip connection
                res_in = (prev_channels if i == 0 else out_channels) + skip_channels[i]
            else:
                res_in = in_channels if i == 0 else out_channels
            resnets.append(ResnetBlock(res_in, out_channels, temb_channels, groups, eps, conv3x3=WinogradF2Conv2d))
            temp_convs.append(TemporalConvLayer(out_channels, groups))
            if head_dim is not None:
                heads = out_channels // head_dim
                attentions.append(Transformer2D(out_channels, heads, head_dim, cfg.cross_attention_dim, groups))
                temp_attentions.append(TransformerTemporal(out_channels, heads, head_dim, groups))
        self.resnets = nn.ModuleList(resnets)
        self.temp_convs = nn.ModuleList(temp_convs)
        if head_dim is not None:
            self.attentions = nn.ModuleList(attentions)
            self.temp_attentions = nn.ModuleList(temp_attentions)
        self.has_attention = head_dim is not None

    def layer(self, i: int, x: torch.Tensor, temb_act: torch.Tensor, context: torch.Tensor | TextKV) -> torch.Tensor:
        x = self.temp_convs[i](self.resnets[i](x, temb_act))
        if self.has_attention:
            x = self.temp_attentions[i](self.attentions[i](x, self.attentions[i].text(context)))
        return x


class UNet3D(nn.Module):
    """UNet3DConditionModel. Module attribute names equal the checkpoint's keys."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        ch = cfg.block_out_channels
        head_dims = cfg.head_dims
        temb = ch[0] * 4
        groups = cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb, cfg.time_cond_proj_dim)
        # transformer_in has 8 heads of width attention_head_dim (a quirk of the published model)
        self.transformer_in = TransformerTemporal(ch[0], 8, head_dims[0], groups)

        self.down_blocks = nn.ModuleList()
        out = ch[0]
        for i, kind in enumerate(cfg.down_block_types):
            inp, out = out, ch[i]
            block = Block3D(inp, out, temb, cfg.layers_per_block, cfg, head_dims[i] if "CrossAttn" in kind else None)
            if i < len(ch) - 1:
                block.downsamplers = nn.ModuleList([Downsample(out, cfg.downsample_padding)])
            self.down_blocks.append(block)

        self.mid_block = MidBlock3D(ch[-1], temb, cfg, head_dims[-1])

        # Skip connections are consumed in reverse order of production.
        skips = [ch[0]]
        for i in range(len(ch)):
            skips += [ch[i]] * cfg.layers_per_block + ([ch[i]] if i < len(ch) - 1 else [])
        self.up_blocks = nn.ModuleList()
        rev_ch, rev_head_dims = ch[::-1], head_dims[::-1]
        prev = rev_ch[0]
        for i, kind in enumerate(cfg.up_block_types):
            n = cfg.layers_per_block + 1
            block_skips = tuple(skips[-1 - j] for j in range(n))
            skips = skips[:-n]
            block = Block3D(0, rev_ch[i], temb, n, cfg, rev_head_dims[i] if "CrossAttn" in kind else None,
                            skip_channels=block_skips, prev_channels=prev)
            if i < len(ch) - 1:
                block.upsamplers = nn.ModuleList([Upsample(rev_ch[i])])
            self.up_blocks.append(block)
            prev = rev_ch[i]

        self.conv_norm_out = nn.GroupNorm(groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)
        # FreeU (s1, s2, b1, b2) or None; like diffusers it is off unless all four are non-zero
        self.freeu: tuple[float, float, float, float] | None = None
        self.gradient_checkpointing = False  # training: recompute each layer in the backward pass
        for i, layer in enumerate(self._cross_attentions()):
            layer.kv_index = i

    def _cross_attentions(self) -> list[Transformer2D]:
        return [m for m in self.modules() if isinstance(m, Transformer2D)]

    def text_kv(self, encoder_hidden_states: torch.Tensor) -> TextKV:
        """The text's keys and values for every cross-attention. They do not change during a generation: pass
        them as `encoder_hidden_states` to every step instead of the text, and the projections run once."""
        return tuple(layer.transformer_blocks[0].attn2.kv(encoder_hidden_states) for layer in self._cross_attentions())

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def _layer(self, block: Block3D, i: int, x: torch.Tensor, temb_act: torch.Tensor,
               context: torch.Tensor | TextKV) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block.layer, i, x, temb_act, context, use_reentrant=False)
        return block.layer(i, x, temb_act, context)

    @property
    def skip_count(self) -> int:
        """Skip connections from the down path to the up path (each up layer consumes one): DeepCache's branches."""
        return sum(len(block.resnets) for block in self.up_blocks)

    @property
    def guidance_embedding_dim(self) -> int | None:
        """Width of the guidance-scale embedding of a guidance-distilled UNet (T2V-Turbo), else None."""
        cond_proj = self.time_embedding.cond_proj
        return None if cond_proj is None else cond_proj.in_features

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                encoder_hidden_states: torch.Tensor | TextKV, timestep_cond: torch.Tensor | None = None,
                cache: FeatureCache | None = None) -> torch.Tensor:
        """sample (B, C, F, H, W), timestep scalar or (B,), encoder_hidden_states (B, S, D) (or (B*F, S, D), one
        per frame) or its `text_kv`, timestep_cond (B, D) the guidance embedding of a guidance-distilled UNet
        -> (B, C, F, H, W). `cache`: a step-caching step (FeatureCache); None runs the whole network."""
        b = sample.shape[0]
        timesteps = torch.as_tensor(timestep, device=sample.device)
        timesteps = timesteps.reshape(-1).expand(b)
        temb = self.time_embedding(timestep_embedding(timesteps, self.config.block_out_channels[0]).to(self.dtype),
                                   timestep_cond)
        temb_act = F.silu(temb)  # (B, Ct): one per video, shared by every resnet
        context = encoder_hidden_states
        if cache is not None and cache.reuse and cache.branch is None:  # Faster Diffusion: the decoder only
            x, skips = cache.hidden, list(cache.skips)
        else:
            x, skips = self._encode(sample, temb_act, context, cache)
        x = self._decode(x, skips, temb_act, context, cache)
        x = conv_cl(self.conv_out, group_norm_silu(self.conv_norm_out, x, batch_dims=2))
        return x.permute(0, 4, 1, 2, 3)  # (B, C, F, H, W)

    def _encode(self, sample: torch.Tensor, temb_act: torch.Tensor, context: torch.Tensor | TextKV,
                cache: FeatureCache | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The down path and the mid block -> (hidden (B, F, h, w, C), skips); a DeepCache reuse step stops once
        skip `cache.branch` is made (its hidden state is then unused)."""
        stop = cache.branch if cache is not None and cache.reuse else None
        x = sample.permute(0, 2, 3, 4, 1).contiguous()  # (B, F, H, W, C)
        x = self.transformer_in(conv_cl(self.conv_in, x))
        skips = [x]
        for block in self.down_blocks:
            for i in range(len(block.resnets)):
                if stop is not None and len(skips) > stop:
                    return x, skips
                x = self._layer(block, i, x, temb_act, context)
                skips.append(x)
            if hasattr(block, "downsamplers"):
                if stop is not None and len(skips) > stop:
                    return x, skips
                x = block.downsamplers[0](x)
                skips.append(x)
        if stop is not None:
            return x, skips
        x = self.mid_block(x, temb_act, context)
        if cache is not None and cache.branch is None:  # Faster Diffusion's key step: keep the encoder's features
            cache.hidden, cache.skips = x, list(skips)
        return x, skips

    def _decode(self, x: torch.Tensor, skips: list[torch.Tensor], temb_act: torch.Tensor,
                context: torch.Tensor | TextKV, cache: FeatureCache | None) -> torch.Tensor:
        """The up path, consuming `skips` deepest first; DeepCache keeps (full step) or takes (reuse step) the
        hidden state entering the layer that consumes skip `cache.branch`, and a reuse step skips what is deeper."""
        branch = cache.branch if cache is not None else None
        reuse = cache is not None and cache.reuse
        position = self.skip_count  # counts down: the skip index each layer consumes
        freeu = self.freeu if self.freeu is not None and all(self.freeu) else None
        for level, block in enumerate(self.up_blocks):
            for i in range(len(block.resnets)):
                position -= 1
                if branch is not None and position == branch:
                    if reuse:
                        x = cache.hidden
                    else:
                        cache.hidden = x
                elif reuse and branch is not None and position > branch:
                    continue
                skip = skips.pop()
                if freeu is not None and level < 2:  # the two lowest-resolution stages
                    s, b_scale = freeu[level], freeu[2 + level]
                    half = x.shape[-1] // 2
                    x = torch.cat([x[..., :half] * b_scale, x[..., half:]], dim=-1)
                    skip = fourier_filter(skip, s)
                x = torch.cat([x, skip], dim=-1)
                x = self._layer(block, i, x, temb_act, context)
            if hasattr(block, "upsamplers") and not (reuse and branch is not None and position > branch):
                x = block.upsamplers[0](x, size=skips[-1].shape[2:4])
        return x


class MidBlock3D(nn.Module):
    def __init__(self, channels: int, temb: int, cfg: UNetConfig, head_dim: int):
        super().__init__()
        groups, eps = cfg.norm_num_groups, cfg.norm_eps
        scale = cfg.mid_block_scale_factor
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, temb, groups, eps, scale, WinogradF2Conv2d)
                                      for _ in range(2)])
        self.temp_convs = nn.ModuleList([TemporalConvLayer(channels, groups) for _ in range(2)])
        heads = channels // head_dim
        self.attentions = nn.ModuleList([Transformer2D(channels, heads, head_dim, cfg.cross_attention_dim, groups)])
        self.temp_attentions = nn.ModuleList([TransformerTemporal(channels, heads, head_dim, groups)])

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor, context: torch.Tensor | TextKV) -> torch.Tensor:
        x = self.temp_convs[0](self.resnets[0](x, temb_act))
        x = self.temp_attentions[0](self.attentions[0](x, self.attentions[0].text(context)))
        return self.temp_convs[1](self.resnets[1](x, temb_act))
