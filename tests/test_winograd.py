"""Winograd convolutions: F(4x4, 3x3) of the VAE and F(2x2, 3x3) of the UNet: the published math against a float64
convolution, the rules that pick the path, and the VAE's frames and the UNet's output against diffusers' with the
path forced on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vidfusion.models import winograd
from vidfusion.models.winograd import WinogradConv2d, WinogradF2Conv2d


def _conv(c_in: int, c_out: int, seed: int = 0, cls: type[WinogradConv2d] = WinogradConv2d) -> WinogradConv2d:
    torch.manual_seed(seed)
    conv = cls(c_in, c_out, 3, padding=1)
    conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)  # as loading stores it
    return conv


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture
def forced(monkeypatch):
    """The Winograd path on for the tiny shapes tests use."""
    monkeypatch.setattr(winograd, "MIN_PIXELS", 1)
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)
    monkeypatch.setattr(winograd, "F2_MIN_CHANNELS", 1)
    monkeypatch.setattr(winograd, "ENABLED", True)


@pytest.mark.parametrize("cls, bound", [
    (WinogradConv2d, 3e-5),  # F(4x4, 3x3): ~1e-5
    (WinogradF2Conv2d, 1e-6),  # F(2x2, 3x3): ~3e-7, below the direct convolution's ~2e-6
])
@pytest.mark.parametrize("n, c_in, c_out, h, w, chunk", [
    (1, 16, 24, 16, 16, 8 << 20),  # one block of tile rows
    (3, 24, 16, 20, 12, 4096),  # several frames, H != W, many blocks (the bottom border inside the last one)
    (2, 8, 8, 8, 28, 1),  # one tile row per block
])
def test_matches_a_float64_convolution(forced, monkeypatch, cls, bound, n, c_in, c_out, h, w, chunk):
    monkeypatch.setattr(winograd, "CHUNK_BYTES", chunk)
    conv = _conv(c_in, c_out, cls=cls)
    x = torch.randn(n, c_in, h, w).contiguous(memory_format=torch.channels_last)
    ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    with torch.no_grad():
        got = conv(x)
        direct = F.conv2d(x, conv.weight, conv.bias, padding=1)
    assert got.shape == ref.shape and got.is_contiguous(memory_format=torch.channels_last)
    assert _relative_error(got, ref) < bound
    assert _relative_error(direct, ref) < 1e-5
    assert not torch.equal(got, direct)  # it did take the other path


def test_the_f2_rule_needs_many_channels_and_pixels_where_its_kernels_are_made_per_call(monkeypatch):
    # measured: 256 channels gain nothing; kernels over CACHE_KERNEL_BYTES (640 ch) are transformed on every call,
    # which small maps (16 frames of 4x4) do not repay. A wrong rule runs the UNet's small convolutions slower.
    monkeypatch.setattr(winograd, "ENABLED", True)
    seen = []
    original = winograd.conv3x3
    monkeypatch.setattr(winograd, "conv3x3", lambda *a: seen.append((a[0].shape, a[3])) or original(*a))
    cases = [((256, 256), (16, 4, 4), False), ((320, 320), (16, 2, 2), True),  # kept kernels: even tiny maps
             ((640, 640), (16, 4, 4), False), ((640, 640), (16, 8, 8), True), ((320, 320), (1, 5, 6), False)]
    with torch.no_grad():
        for (c_in, c_out), (n, h, w), taken in cases:
            conv = _conv(c_in, c_out, cls=WinogradF2Conv2d)
            x = torch.randn(n, c_in, h, w).contiguous(memory_format=torch.channels_last)
            got = conv(x)
            assert bool(seen) == taken, (c_in, n, h, w)
            ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
            assert _relative_error(got, ref) < 1e-5
            if taken:
                assert seen[0] == ((n, h, w, c_in), winograd.F2)
            seen.clear()


def test_without_bias_and_from_a_non_contiguous_view(forced):
    conv = _conv(8, 12)
    conv.bias = None
    x = torch.randn(2, 8, 12, 16)  # NCHW-contiguous: permuted to NHWC by a copy
    with torch.no_grad():
        got = conv(x)
    ref = F.conv2d(x.double(), conv.weight.double(), None, padding=1)
    assert _relative_error(got, ref) < 3e-5


def test_the_rule_keeps_the_plain_convolution_where_winograd_does_not_pay_or_cannot_run(monkeypatch):
    monkeypatch.setattr(winograd, "ENABLED", True)
    calls = []
    monkeypatch.setattr(winograd, "conv3x3", lambda *a: calls.append(a) or _direct(*a))

    def _direct(x, kernels, bias):
        raise AssertionError("not reached in the cases below")

    big = _conv(128, 128)
    cases = [
        (big, torch.randn(1, 128, 16, 16)),  # small map: below MIN_PIXELS
        (big, torch.randn(1, 128, 36, 30)),  # side not a multiple of the 4x4 tile
        (_conv(128, 128).to(torch.bfloat16), torch.randn(1, 128, 32, 32, dtype=torch.bfloat16)),  # half precision
        (_conv(64, 64), torch.randn(1, 64, 64, 64)),  # too few channels for fast products
    ]
    with torch.no_grad():
        for conv, x in cases:
            x = x.contiguous(memory_format=torch.channels_last)
            assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
    x = torch.randn(1, 128, 32, 32, requires_grad=True)  # autograd: plain convolution
    assert torch.equal(big(x), F.conv2d(x, big.weight, big.bias, padding=1))
    assert not calls
    monkeypatch.setattr(winograd, "ENABLED", False)  # VIDFUSION_WINOGRAD=0
    with torch.no_grad():
        x = torch.randn(1, 128, 32, 32).contiguous(memory_format=torch.channels_last)
        assert torch.equal(big(x), F.conv2d(x, big.weight, big.bias, padding=1))
    assert not calls


def test_large_maps_take_the_path_by_default(monkeypatch):
    monkeypatch.setattr(winograd, "ENABLED", True)
    seen = []
    original = winograd.conv3x3
    monkeypatch.setattr(winograd, "conv3x3", lambda *a: seen.append(a[0].shape) or original(*a))
    conv = _conv(128, 128)
    x = torch.randn(1, 128, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = conv(x)
    assert seen == [(1, 32, 32, 128)]
    ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    assert _relative_error(got, ref) < 3e-5


@pytest.mark.parametrize("cache_bytes", [1 << 30, 0])  # kept kernels, and kernels made per call in a buffer
def test_kernels_follow_weight_changes(forced, monkeypatch, cache_bytes):
    monkeypatch.setattr(winograd, "CACHE_KERNEL_BYTES", cache_bytes)
    conv = _conv(8, 8)
    x = torch.randn(1, 8, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        conv(x)
        conv.weight.mul_(-2.0)  # in place: the cached kernels are stale now
        got = conv(x)
    ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    assert _relative_error(got, ref) < 3e-5


def test_moving_the_module_drops_the_kept_kernels(forced):
    conv = _conv(8, 8)
    x = torch.randn(1, 8, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        conv(x)
        assert conv._kernels is not None
        conv.to(torch.float64)  # as .to("cuda") would: the kept float32 kernels would only hold memory
        assert conv._kernels is None
        conv.float()
        got = conv(x)
    ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    assert _relative_error(got, ref) < 3e-5


def test_the_vae_uses_it_for_its_resnet_convolutions_and_keeps_its_keys():
    from diffusers import AutoencoderKL as DiffusersVAE

    from tests.conftest import TINY_VAE
    from vidfusion.models.config import VAEConfig
    from vidfusion.models.vae import AutoencoderKL

    ours = AutoencoderKL(VAEConfig.from_dict(DiffusersVAE(**TINY_VAE).config))
    kinds = {name: type(m) for name, m in ours.named_modules() if isinstance(m, nn.Conv2d)}
    assert kinds["decoder.up_blocks.0.resnets.0.conv1"] is WinogradConv2d
    assert kinds["encoder.mid_block.resnets.1.conv2"] is WinogradConv2d
    assert kinds["decoder.conv_out"] is nn.Conv2d  # 3 output channels: plain
    assert set(ours.state_dict()) == set(DiffusersVAE(**TINY_VAE).state_dict())


def test_decoded_frames_match_diffusers_with_the_path_forced(forced, reference, ours):
    torch.manual_seed(0)
    latents = torch.randn(3, TINY_LATENT_CHANNELS, 8, 8)
    seen = []
    original = winograd.conv3x3
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(winograd, "conv3x3", lambda *a: seen.append(1) or original(*a))
        got = ours.vae.decode(latents)
        ref = reference.vae.decode(latents).sample
    assert seen  # the tiny VAE's 8x8..16x16 maps took the path
    assert (got - ref).abs().max().item() < 1e-4


TINY_LATENT_CHANNELS = 4


def test_decoder_groups_frames_by_activation_size_with_the_same_frames(ours):
    """On CPU the decoder takes as many frames at once as fit its per-activation budget at each resolution."""
    decoder = ours.vae.decoder
    torch.manual_seed(1)
    z = torch.randn(5, 8, 8, 4)  # (N, h, w, C) latents
    sizes = []
    hook = decoder.up_blocks[-1].resnets[0].register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            whole = decoder(z)  # no budget: all 5 frames together
            assert sizes == [5]
            sizes.clear()
            c_last = decoder.up_blocks[-1].resnets[-1].conv2.out_channels
            frame_bytes = 16 * 16 * max(decoder.up_blocks[-1].resnets[0].norm1.num_channels, c_last) * 4
            grouped = decoder(z, chunk_bytes=2 * frame_bytes)  # 2 frames per group at the last block
    finally:
        hook.remove()
    assert sizes == [2, 2, 1]
    assert torch.allclose(grouped, whole, atol=1e-5)


def test_the_unet_uses_f2_for_its_resnet_convolutions_and_matches_diffusers(forced, reference, ours):
    # the UNet's resnet 3x3 convolutions through F(2x2, 3x3) (forced for the tiny model's 32-64 channels): the same
    # output as diffusers' UNet3D to the parity tolerance. Catches F(4x4)'s matrices on this path or a wrong tile.
    kinds = {name: type(m) for name, m in ours.unet.named_modules() if isinstance(m, nn.Conv2d)}
    assert kinds["down_blocks.0.resnets.0.conv1"] is WinogradF2Conv2d
    assert kinds["mid_block.resnets.1.conv2"] is WinogradF2Conv2d
    assert kinds["conv_in"] is nn.Conv2d
    torch.manual_seed(0)
    sample = torch.randn(2, TINY_LATENT_CHANNELS, 4, 8, 8)
    text = torch.randn(2, 77, reference.unet.config.cross_attention_dim)
    seen = []
    original = winograd.conv3x3
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(winograd, "conv3x3", lambda *a: seen.append(a[3]) or original(*a))
        got = ours.unet(sample, torch.tensor(500), text)
        ref = reference.unet(sample, torch.tensor(500), encoder_hidden_states=text).sample
    assert seen and set(seen) == {winograd.F2}
    assert (got - ref).abs().max().item() < 1e-5
