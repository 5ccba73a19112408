"""Original ModelScope (UNetSD) names <-> diffusers names, as tables of rules built from the UNet config.

The original release numbers its blocks sequentially: `input_blocks.0` is [conv_in, transformer_in]; every
down layer is `input_blocks.K` = [resnet (with its `temopral_conv`, sic), spatial attention, temporal attention];
a downsampler is `input_blocks.K.op`; `middle_block` is [resnet, attention, temporal attention, resnet];
`output_blocks.K` mirror the down layers with the upsampler last. Inside resnets the names differ too.
"""

from __future__ import annotations

from ..models.config import UNetConfig

# inside a resnet: original name -> diffusers name
RESNET_RULES = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
                ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut"))


Rule = tuple[str, str, tuple[tuple[str, str], ...]]  # (original prefix, diffusers prefix, renames inside it)


def unet_block_rules(cfg: UNetConfig) -> list[Rule]:
    """(original prefix, diffusers prefix, renames inside) for every block of a UNet with this config."""
    per_down = cfg.layers_per_block
    rules: list[Rule] = [("time_embed.0", "time_embedding.linear_1", ()),
                         ("time_embed.2", "time_embedding.linear_2", ()), ("input_blocks.0.0", "conv_in", ()),
                         ("input_blocks.0.1", "transformer_in", ()), ("out.0", "conv_norm_out", ()),
                         ("out.2", "conv_out", ())]

    def layer(original: str, block: str, j: int, attention: bool) -> None:
        rules.extend([(f"{original}.0.temopral_conv", f"{block}.temp_convs.{j}", ()),
                      (f"{original}.0", f"{block}.resnets.{j}", RESNET_RULES)])
        if attention:
            rules.extend([(f"{original}.1", f"{block}.attentions.{j}", ()),
                          (f"{original}.2", f"{block}.temp_attentions.{j}", ())])

    levels = len(cfg.block_out_channels)
    for i, kind in enumerate(cfg.down_block_types):
        for j in range(per_down):
            layer(f"input_blocks.{1 + i * (per_down + 1) + j}", f"down_blocks.{i}", j, "CrossAttn" in kind)
        if i < levels - 1:
            rules.append((f"input_blocks.{(i + 1) * (per_down + 1)}.op", f"down_blocks.{i}.downsamplers.0.conv", ()))
    rules.extend([("middle_block.0.temopral_conv", "mid_block.temp_convs.0", ()),
                  ("middle_block.0", "mid_block.resnets.0", RESNET_RULES),
                  ("middle_block.1", "mid_block.attentions.0", ()),
                  ("middle_block.2", "mid_block.temp_attentions.0", ()),
                  ("middle_block.3.temopral_conv", "mid_block.temp_convs.1", ()),
                  ("middle_block.3", "mid_block.resnets.1", RESNET_RULES)])
    per_up = per_down + 1
    for i, kind in enumerate(cfg.up_block_types):
        attention = "CrossAttn" in kind
        for j in range(per_up):
            layer(f"output_blocks.{i * per_up + j}", f"up_blocks.{i}", j, attention)
        if i < levels - 1:
            rules.append((f"output_blocks.{i * per_up + per_up - 1}.{3 if attention else 1}",
                          f"up_blocks.{i}.upsamplers.0", ()))
    return rules


def _rename(name: str, rules: list[Rule], to_diffusers: bool) -> str | None:
    """Longest matching block prefix, then the renames inside that block."""
    best = None
    for original, diffusers, inner in rules:
        src, dst = (original, diffusers) if to_diffusers else (diffusers, original)
        if (name == src or name.startswith(src + ".")) and (best is None or len(src) > len(best[0])):
            best = (src, dst, inner)
    if best is None:
        return None
    src, dst, inner = best
    rest = name[len(src):]
    for original, diffusers in inner:
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


# ---- VAE: the LDM AutoencoderKL ------------------------------------------------------------------------------

VAE_RESNET_RULES = (("nin_shortcut", "conv_shortcut"),)
# the mid-block attention: 1x1 convs in the original, linears in diffusers
VAE_ATTENTION_RULES = (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))


def vae_block_rules(levels: int, layers_per_block: int) -> list[Rule]:
    """Rules for an AutoencoderKL with `levels` resolutions; the decoder's `up` is numbered from the lowest
    resolution in the original and from the highest in diffusers."""
    rules: list[Rule] = [("quant_conv", "quant_conv", ()), ("post_quant_conv", "post_quant_conv", ())]
    for part in ("encoder", "decoder"):
        rules += [(f"{part}.conv_in", f"{part}.conv_in", ()), (f"{part}.conv_out", f"{part}.conv_out", ()),
                  (f"{part}.norm_out", f"{part}.conv_norm_out", ()),
                  (f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", VAE_RESNET_RULES),
                  (f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", VAE_RESNET_RULES),
                  (f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", VAE_ATTENTION_RULES)]
    for i in range(levels):
        for j in range(layers_per_block):
            rules.append((f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", VAE_RESNET_RULES))
        if i < levels - 1:
            rules.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv", ()))
        up = levels - 1 - i
        for j in range(layers_per_block + 1):
            rules.append((f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}", VAE_RESNET_RULES))
        if i > 0:
            rules.append((f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{up}.upsamplers.0.conv", ()))
    return rules


def vae_name_to_diffusers(name: str, levels: int, layers_per_block: int) -> str | None:
    return _rename(name, vae_block_rules(levels, layers_per_block), to_diffusers=True)


def vae_name_to_original(name: str, levels: int, layers_per_block: int) -> str | None:
    return _rename(name, vae_block_rules(levels, layers_per_block), to_diffusers=False)


# ---- text encoder: OpenCLIP's text tower <-> transformers' CLIPTextModel ---------------------------------------

CLIP_RULES: list[Rule] = [("token_embedding", "embeddings.token_embedding", ()),
                          ("positional_embedding", "embeddings.position_embedding.weight", ()),
                          ("ln_final", "final_layer_norm", ())]
CLIP_LAYER_RULES = (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                    ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"))


def clip_name_to_transformers(name: str, layers: int) -> str | None:
    """An OpenCLIP text-tower key -> CLIPTextModel's (without the "text_model." prefix); None for what the
    text-to-video model does not use (visual tower, projection, logit scale, blocks from `layers` on).
    attn.in_proj_* keys map to a "{q,k,v}" placeholder: split them with split_in_proj."""
    rules = CLIP_RULES + [(f"transformer.resblocks.{i}", f"encoder.layers.{i}",
                           CLIP_LAYER_RULES + (("attn.in_proj_weight", "self_attn.{qkv}_proj.weight"),
                                               ("attn.in_proj_bias", "self_attn.{qkv}_proj.bias")))
                          for i in range(layers)]
    return _rename(name, rules, to_diffusers=True)
