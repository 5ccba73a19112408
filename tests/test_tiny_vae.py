"""TAESD's decoder: the same images as diffusers' AutoencoderTiny on random weights in its layout, the original
taesd_decoder.pth layout, and decoder="tiny" in the pipeline."""

from __future__ import annotations

import pytest
import torch

from vidfusion.checkpoints.tiny_decoder import load_tiny_decoder
from vidfusion.models.tiny_vae import TinyDecoder


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    model = AutoencoderTiny(decoder_block_out_channels=(16, 16, 16, 16), encoder_block_out_channels=(16, 16, 16, 16))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    folder = tmp_path_factory.mktemp("taesd")
    model.save_pretrained(folder)
    return model.eval(), folder


def test_decoder_matches_diffusers_autoencoder_tiny(reference):
    """Catches a wrong clamp, layer order or output range: diffusers' decode on the same random weights."""
    model, folder = reference
    ours = load_tiny_decoder(folder)
    latents = torch.randn(2, 4, 8, 8) * 2
    with torch.no_grad():
        expected = model.decode(latents).sample
        got = ours(latents)
    assert got.shape == (2, 3, 64, 64)
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5


def test_original_layout_is_the_same_decoder(reference, tmp_path):
    """madebyollin's taesd_decoder.pth: a Sequential whose index 0 is the clamp (keys shifted by one)."""
    model, folder = reference
    ours = load_tiny_decoder(folder)
    original = {f"{int(k.split('.')[1]) + 1}.{k.split('.', 2)[2]}": v for k, v in ours.state_dict().items()}
    torch.save(original, tmp_path / "taesd_decoder.pth")
    again = load_tiny_decoder(tmp_path / "taesd_decoder.pth")
    assert isinstance(again, TinyDecoder)
    latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(again(latents), ours(latents))
    torch.save({"oops.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="oops.weight.*Decoder"):
        load_tiny_decoder(tmp_path / "bad.pth")


def test_pipeline_decoder_tiny(ours, reference):
    """decoder="tiny": the final decode by TAESD (the same frames as the tiny decoder on the latents); without a
    loaded tiny decoder it is a clear error."""
    args = dict(prompt="a cat", num_frames=2, height=64, width=64, num_inference_steps=2)
    with pytest.raises(ValueError, match="load_tiny_decoder"):
        ours(decoder="tiny", **args)
    _, folder = reference
    ours.load_tiny_decoder(folder)
    try:
        latents = ours(generator=torch.Generator().manual_seed(0), output_type="latent", **args).frames
        frames = ours(generator=torch.Generator().manual_seed(0), decoder="tiny", output_type="pt", **args).frames
    finally:
        ours.tiny_decoder = None
    with torch.no_grad():
        b, c, f, h, w = latents.shape
        expected = load_tiny_decoder(folder)(latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w))
    expected = (expected / 2 + 0.5).clamp(0, 1).view(b, f, 3, 8 * h, 8 * w)
    assert frames.shape == (1, 2, 3, 8 * h, 8 * w) and torch.allclose(frames, expected, atol=1e-6)


def test_cli_decoder_tiny(tiny_checkpoint, reference, tmp_path):
    from vidfusion.cli.main import main as cli_main
    from vidfusion.media.video_io import read_metadata

    _, folder = reference
    out = tmp_path / "draft.mp4"
    assert cli_main(["generate", "a cat", "--model", str(tiny_checkpoint), "--frames", "2", "--steps", "1",
                     "--height", "64", "--width", "64", "--decoder", f"tiny:{folder}", "--out", str(out),
                     "--quiet"]) == 0
    assert read_metadata(out)["decoder"] == f"tiny:{folder}"
    assert cli_main(["generate", "a cat", "--model", str(tiny_checkpoint), "--decoder", "small", "--quiet",
                     "--out", str(tmp_path / "x.mp4")]) == 2


# ---- TAESDV: a reference module tree built the way madebyollin/taesdv's taesdv.py builds its TAESDV (its class
# and attribute names: `decoder` a Sequential of Clamp, 3x3 convs, ReLU, MemBlock(conv Sequential, skip, act),
# Upsample, bias-free convs after each Upsample; an `encoder` of Blocks the file also holds), its random weights
# saved under the names *that* tree gives them, and its decode_frame loop (one frame at a time, each MemBlock fed
# its own input of the previous frame, zeros for the first). Our loader must read this file as published.

def _reference_taesdv_module(width: int):
    import torch.nn as nn

    def conv(n_in, n_out, **kwargs):
        return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)

    class Clamp(nn.Module):
        def forward(self, x):
            return torch.tanh(x / 3) * 3

    class Block(nn.Module):
        def __init__(self, n_in, n_out):
            super().__init__()
            self.conv = nn.Sequential(conv(n_in, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(), conv(n_out, n_out))
            self.skip = nn.Identity()
            self.fuse = nn.ReLU()

    class MemBlock(nn.Module):
        def __init__(self, n_in, n_out):
            super().__init__()
            self.conv = nn.Sequential(conv(n_in * 2, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(),
                                      conv(n_out, n_out))
            self.skip = nn.Identity()
            self.act = nn.ReLU()

        def forward(self, x, memory):
            return self.act(self.conv(torch.cat([x, memory], 1)) + self.skip(x))

    class TAESDV(nn.Module):
        def __init__(self):
            super().__init__()
            w = width
            self.encoder = nn.Sequential(conv(3, w), Block(w, w), conv(w, w, stride=2, bias=False), Block(w, w),
                                         conv(w, w, stride=2, bias=False), Block(w, w),
                                         conv(w, w, stride=2, bias=False), Block(w, w), conv(w, 4))
            self.decoder = nn.Sequential(
                Clamp(), conv(4, w), nn.ReLU(),
                MemBlock(w, w), MemBlock(w, w), MemBlock(w, w), nn.Upsample(scale_factor=2), conv(w, w, bias=False),
                MemBlock(w, w), MemBlock(w, w), MemBlock(w, w), nn.Upsample(scale_factor=2), conv(w, w, bias=False),
                MemBlock(w, w), MemBlock(w, w), MemBlock(w, w), nn.Upsample(scale_factor=2), conv(w, w, bias=False),
                MemBlock(w, w), conv(w, 3))

        def decode_frame(self, x, memory=None):
            new_memory, old = [], None if memory is None else list(memory)
            for layer in self.decoder:
                if isinstance(layer, MemBlock):
                    new_memory.append(x)
                    x = layer(x, torch.zeros_like(x) if old is None else old.pop(0))
                else:
                    x = layer(x)
            return x, new_memory

    model = TAESDV()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.15)
    return model.eval()


def _reference_taesdv(model, latents: torch.Tensor) -> torch.Tensor:
    """latents (T, 4, h, w) of one video -> frames (T, 3, H, W) in ~[0, 1], frame by frame with memory."""
    out, memory = [], None
    with torch.no_grad():
        for latent in latents.split(1):
            frame, memory = model.decode_frame(latent, memory)
            out.append(frame)
    return torch.cat(out)


def test_taesdv_decoder_matches_the_published_frame_by_frame_decode(tmp_path):
    """All frames at once with the memory as the input shifted by one frame == the published decode_frame loop (a
    decoder that fed the current frame, the next one, or no memory at all as memory fails)."""
    from vidfusion.models.tiny_vae import TinyVideoDecoder, decode_frames

    reference = _reference_taesdv_module(16)
    torch.save(reference.state_dict(), tmp_path / "taesdv.pth")  # the published file's key names and bias-free convs
    ours = load_tiny_decoder(tmp_path / "taesdv.pth")
    assert isinstance(ours, TinyVideoDecoder)
    assert isinstance(load_tiny_decoder(tmp_path), TinyVideoDecoder)  # a folder holding taesdv.pth
    latents = torch.randn(2, 4, 5, 6, 6) * 2  # (B, C, F, h, w): two videos of 5 frames
    got = decode_frames(ours, latents)  # (B, F, 3, H, W) in [-1, 1]
    for b in range(2):
        expected = _reference_taesdv(reference, latents[b].permute(1, 0, 2, 3)) * 2 - 1
        assert ((got[b] - expected).abs().max() / expected.abs().max()).item() < 1e-5
    without_memory = decode_frames(ours, latents[:, :, 2:3])[:, 0]  # frame 2 alone: no memory of frames 0-1
    assert (without_memory - got[:, 2]).abs().max() > 1e-3


def test_preview_by_the_tiny_decoder(ours, reference):
    """pipe.preview: the latents' approximate colours at latent size by default; real pictures at full size from
    the tiny decoder once loaded (the same as decoding those latents)."""
    from vidfusion.models.tiny_vae import decode_frames

    _, folder = reference
    latents = torch.randn(1, 4, 2, 4, 4)
    assert ours.preview(latents).shape == (1, 2, 4, 4, 3)
    ours.load_tiny_decoder(folder)
    try:
        frames = ours.preview(latents)
        expected = ((decode_frames(ours.tiny_decoder, latents).clamp(-1, 1) + 1) * 127.5).round()
        assert frames.shape == (1, 2, 32, 32, 3)
        assert torch.equal(torch.from_numpy(frames).permute(0, 1, 4, 2, 3).float(), expected)
    finally:
        ours.tiny_decoder = None
