"""TAESD's decoder: the same images as diffusers' AutoencoderTiny on random weights in its layout, the original
taesd_decoder.pth layout, and decoder="tiny" in the pipeline."""

from __future__ import annotations

import pytest
import torch

from vidfusion.tiny_vae import TinyDecoder, load_tiny_decoder


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
    from vidfusion import cli
    from vidfusion.video_io import read_metadata

    _, folder = reference
    out = tmp_path / "draft.mp4"
    assert cli.main(["generate", "a cat", "--model", str(tiny_checkpoint), "--frames", "2", "--steps", "1",
                     "--height", "64", "--width", "64", "--decoder", f"tiny:{folder}", "--out", str(out),
                     "--quiet"]) == 0
    assert read_metadata(out)["decoder"] == f"tiny:{folder}"
    assert cli.main(["generate", "a cat", "--model", str(tiny_checkpoint), "--decoder", "small", "--quiet",
                     "--out", str(tmp_path / "x.mp4")]) == 2
