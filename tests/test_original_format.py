"""Original ModelScope files: UNet names both ways (checked against the published key patterns), and the
restricted checkpoint reader on a Lightning-style VAE file whose pickle names a class that must never run."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from vidfusion.config import FULL_UNET, UNetConfig
from vidfusion.original_format import (
    ConversionError,
    read_checkpoint,
    state_dict_of,
    unet_to_diffusers,
    unet_to_original,
)
from vidfusion.unet3d import UNet3D

# original name -> diffusers name for the published 1.7B config (input_blocks 3*i + j + 1, downsamplers at
# 3*(i+1), output_blocks 3*i + j, upsamplers at output_blocks.{3*i + 2}.{1 if i == 0 else 3}, the resnet renames)
PUBLISHED = {
    "time_embed.0.weight": "time_embedding.linear_1.weight",
    "time_embed.2.bias": "time_embedding.linear_2.bias",
    "input_blocks.0.0.weight": "conv_in.weight",
    "input_blocks.0.1.proj_in.weight": "transformer_in.proj_in.weight",
    "input_blocks.1.0.in_layers.0.weight": "down_blocks.0.resnets.0.norm1.weight",
    "input_blocks.1.0.in_layers.2.weight": "down_blocks.0.resnets.0.conv1.weight",
    "input_blocks.2.0.emb_layers.1.weight": "down_blocks.0.resnets.1.time_emb_proj.weight",
    "input_blocks.2.0.out_layers.3.bias": "down_blocks.0.resnets.1.conv2.bias",
    "input_blocks.1.0.temopral_conv.conv1.0.weight": "down_blocks.0.temp_convs.0.conv1.0.weight",
    "input_blocks.2.0.temopral_conv.conv4.3.weight": "down_blocks.0.temp_convs.1.conv4.3.weight",
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight":
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
    "input_blocks.2.2.proj_out.weight": "down_blocks.0.temp_attentions.1.proj_out.weight",
    "input_blocks.3.op.weight": "down_blocks.0.downsamplers.0.conv.weight",
    "input_blocks.4.0.skip_connection.weight": "down_blocks.1.resnets.0.conv_shortcut.weight",
    "input_blocks.11.0.out_layers.0.weight": "down_blocks.3.resnets.1.norm2.weight",
    "middle_block.0.in_layers.0.weight": "mid_block.resnets.0.norm1.weight",
    "middle_block.1.proj_in.weight": "mid_block.attentions.0.proj_in.weight",
    "middle_block.2.transformer_blocks.0.ff.net.2.weight":
        "mid_block.temp_attentions.0.transformer_blocks.0.ff.net.2.weight",
    "middle_block.3.temopral_conv.conv4.3.bias": "mid_block.temp_convs.1.conv4.3.bias",
    "output_blocks.0.0.skip_connection.weight": "up_blocks.0.resnets.0.conv_shortcut.weight",
    "output_blocks.2.1.conv.weight": "up_blocks.0.upsamplers.0.conv.weight",
    "output_blocks.5.3.conv.bias": "up_blocks.1.upsamplers.0.conv.bias",
    "output_blocks.8.3.conv.weight": "up_blocks.2.upsamplers.0.conv.weight",
    "output_blocks.11.2.norm.weight": "up_blocks.3.temp_attentions.2.norm.weight",
    "out.0.weight": "conv_norm_out.weight",
    "out.2.bias": "conv_out.bias",
}


def full_unet_state():
    with torch.device("meta"):
        return UNet3D(FULL_UNET).state_dict()


def test_published_names_both_ways():
    state = full_unet_state()
    original = unet_to_original(state, FULL_UNET)
    for orig, diffusers in PUBLISHED.items():
        assert diffusers in state and orig in original, (orig, diffusers)
    assert original["input_blocks.0.1.proj_in.weight"].shape == (512, 320, 1)  # Conv1d in the original
    assert original["input_blocks.2.2.proj_out.weight"].shape == (320, 320, 1)
    assert original["input_blocks.1.1.proj_in.weight"].dim() == 2  # spatial ones stay Linear
    assert all(k.startswith(("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "out."))
               for k in original)
    back = unet_to_diffusers(original, FULL_UNET)
    assert back.keys() == state.keys() and all(back[k].shape == state[k].shape for k in state)


def test_tiny_unet_round_trip_through_a_pth_file(tiny_checkpoint, tmp_path):
    from vidfusion.loading import read_json, read_weights

    cfg = UNetConfig.from_dict(read_json(tiny_checkpoint / "unet" / "config.json"))
    state = read_weights(tiny_checkpoint / "unet", None)
    original = unet_to_original(state, cfg)
    torch.save(original, tmp_path / "text2video_pytorch_model.pth")
    back = unet_to_diffusers(state_dict_of(read_checkpoint(tmp_path / "text2video_pytorch_model.pth"), "unet"), cfg)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(ConversionError, match="not part of the original UNet.*bogus.weight"):
        unet_to_diffusers({**original, "bogus.weight": torch.zeros(1)}, cfg)


class MarkerCallback:
    """Stands for pytorch_lightning's ModelCheckpoint: instantiating it would write a marker file."""

    def __init__(self, marker):
        with open(marker, "w") as f:
            f.write("instantiated")

    def __reduce__(self):
        return (MarkerCallback, (self.marker,))


def test_lightning_vae_checkpoint_without_running_pickled_code(tmp_path):
    marker = tmp_path / "marker"
    callback = MarkerCallback.__new__(MarkerCallback)
    callback.marker = str(marker)
    weights = {"first_stage_model.encoder.conv_in.weight": torch.randn(8, 3, 3, 3),
               "first_stage_model.decoder.conv_out.bias": torch.randn(3).half(),
               "loss.logvar": torch.zeros(())}
    checkpoint = {"epoch": np.int64(7), "global_step": 1000, "callbacks": {"ModelCheckpoint": callback},
                  "state_dict": weights, "lr_schedulers": [], "hparams": {"lr": np.float64(4.5e-6)}}
    torch.save(checkpoint, tmp_path / "VQGAN_autoencoder.pth")
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "VQGAN_autoencoder.pth", weights_only=True)  # why a reader of our own is needed
    obj = read_checkpoint(tmp_path / "VQGAN_autoencoder.pth")
    assert not marker.exists()  # the class was never instantiated
    assert type(obj["callbacks"]["ModelCheckpoint"]).__module__.startswith("inert.")
    state = state_dict_of(obj, "VQGAN_autoencoder.pth", prefix="first_stage_model.")
    assert set(state) == {"encoder.conv_in.weight", "decoder.conv_out.bias"}
    assert torch.equal(state["encoder.conv_in.weight"], weights["first_stage_model.encoder.conv_in.weight"])
    assert state["decoder.conv_out.bias"].dtype == torch.float16


def test_bad_files(tmp_path):
    torch.save({"a": torch.zeros(1000)}, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="cut.pth"):
        read_checkpoint(tmp_path / "cut.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ConversionError, match="not a state dict"):
        state_dict_of(read_checkpoint(tmp_path / "list.pth"), "list.pth")
    with pytest.raises(ConversionError, match="missing file"):
        read_checkpoint(tmp_path / "nope.pth")
