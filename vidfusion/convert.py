"""Original ModelScope (UNetSD) names <-> diffusers names, as tables of rules built from the UNet config.

The original release numbers its blocks sequentially: `input_blocks.0` is [conv_in, transformer_in]; every
down layer is `input_blocks.K` = [resnet (with its `temopral_conv`, sic), spatial attention, temporal attention];
a downsampler is `input_blocks.K.op`; `middle_block` is [resnet, attention, temporal attention, resnet];
`output_blocks.K` mirror the down layers with the upsampler last. Inside resnets the names differ too.
"""

from __future__ import annotations

from .config import UNetConfig

# inside a resnet: original name -> diffusers name
RESNET_RULES = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
                ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut"))


def unet_block_rules(cfg: UNetConfig) -> list[tuple[str, str, bool]]:
    """(original prefix, diffusers prefix, is_resnet) for every block of a UNet with this config."""
    per_down = cfg.layers_per_block
    rules = [("time_embed.0", "time_embedding.linear_1", False), ("time_embed.2", "time_embedding.linear_2", False),
             ("input_blocks.0.0", "conv_in", False), ("input_blocks.0.1", "transformer_in", False),
             ("out.0", "conv_norm_out", False), ("out.2", "conv_out", False)]

    def layer(original: str, block: str, j: int, attention: bool) -> None:
        rules.extend([(f"{original}.0.temopral_conv", f"{block}.temp_convs.{j}", False),
                      (f"{original}.0", f"{block}.resnets.{j}", True)])
        if attention:
            rules.extend([(f"{original}.1", f"{block}.attentions.{j}", False),
                          (f"{original}.2", f"{block}.temp_attentions.{j}", False)])

    levels = len(cfg.block_out_channels)
    for i, kind in enumerate(cfg.down_block_types):
        for j in range(per_down):
            layer(f"input_blocks.{1 + i * (per_down + 1) + j}", f"down_blocks.{i}", j, "CrossAttn" in kind)
        if i < levels - 1:
            rules.append((f"input_blocks.{(i + 1) * (per_down + 1)}.op", f"down_blocks.{i}.downsamplers.0.conv", False))
    rules.extend([("middle_block.0.temopral_conv", "mid_block.temp_convs.0", False),
                  ("middle_block.0", "mid_block.resnets.0", True), ("middle_block.1", "mid_block.attentions.0", False),
                  ("middle_block.2", "mid_block.temp_attentions.0", False),
                  ("middle_block.3.temopral_conv", "mid_block.temp_convs.1", False),
                  ("middle_block.3", "mid_block.resnets.1", True)])
    per_up = per_down + 1
    for i, kind in enumerate(cfg.up_block_types):
        attention = "CrossAttn" in kind
        for j in range(per_up):
            layer(f"output_blocks.{i * per_up + j}", f"up_blocks.{i}", j, attention)
        if i < levels - 1:
            rules.append((f"output_blocks.{i * per_up + per_up - 1}.{3 if attention else 1}",
                          f"up_blocks.{i}.upsamplers.0", False))
    return rules


def _rename(name: str, rules: list[tuple[str, str, bool]], to_diffusers: bool) -> str | None:
    best = None
    for original, diffusers, resnet in rules:
        src, dst = (original, diffusers) if to_diffusers else (diffusers, original)
        if (name == src or name.startswith(src + ".")) and (best is None or len(src) > len(best[0])):
            best = (src, dst, resnet)
    if best is None:
        return None
    src, dst, resnet = best
    rest = name[len(src):]
    if resnet and rest:
        for original, diffusers in RESNET_RULES:
            a, b = (original, diffusers) if to_diffusers else (diffusers, original)
            if rest == "." + a or rest.startswith("." + a + "."):
                rest = "." + b + rest[len(a) + 1:]
                break
    return dst + rest


def unet_name_to_diffusers(name: str, cfg: UNetConfig) -> str | None:
    """An original ModelScope UNet module or key name -> its diffusers name (None if no rule matches)."""
    return _rename(name, unet_block_rules(cfg), to_diffusers=True)


def unet_name_to_original(name: str, cfg: UNetConfig) -> str | None:
    """A diffusers UNet module or key name -> its original ModelScope name (None if no rule matches)."""
    return _rename(name, unet_block_rules(cfg), to_diffusers=False)
