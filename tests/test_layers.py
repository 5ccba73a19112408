"""Building blocks against plain references: the layout-keeping GroupNorm and the strided temporal attention."""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from vidfusion.models import layers
from vidfusion.models.layers import attention, group_norm_channels_last

from .test_parity import BASE, assert_latents_close, run_ours, run_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_layout_keeping_group_norm_matches_torch(dtype):
    torch.manual_seed(0)
    x = (torch.randn(3, 500, 64) * 2 + 5).to(dtype)  # a mean offset, as activations have
    weight, bias = torch.randn(64).to(dtype), torch.randn(64).to(dtype)
    exact = F.group_norm(x.double().transpose(1, 2), 8, weight.double(), bias.double(), 1e-5).transpose(1, 2)
    native = F.group_norm(x.transpose(1, 2), 8, weight, bias, 1e-5).transpose(1, 2)
    got = group_norm_channels_last(x, 8, weight, bias, 1e-5)
    assert got.dtype == dtype and got.shape == x.shape and got.is_contiguous()
    native_error = (native.double() - exact).abs().max().item()
    error = (got.double() - exact).abs().max().item()
    assert error <= max(2e-6, 1.01 * native_error), (error, native_error)
    strided = x[:, ::2]  # any layout in, same values out
    torch.testing.assert_close(group_norm_channels_last(strided, 8, weight, bias, 1e-5),
                               group_norm_channels_last(strided.contiguous(), 8, weight, bias, 1e-5))


def test_the_gpu_group_norm_path_keeps_diffusers_parity(reference, ours, monkeypatch):
    # on CUDA group_norm_cl uses group_norm_channels_last for every norm of the UNet and the VAE; force it here
    expected_latents = run_reference(reference, "dpmpp-2m", output_type="latent", **BASE)
    expected_frames = run_reference(reference, "dpmpp-2m", **BASE)
    monkeypatch.setattr(layers, "keeps_channels_last", lambda device: False)
    assert_latents_close(expected_latents, run_ours(ours, "dpmpp-2m", output_type="latent", **BASE))
    assert np.abs(run_ours(ours, "dpmpp-2m", **BASE) - expected_frames).max() < 1e-3  # the VAE's norms too


def per_position_attention(q, k, v, heads):
    # the reference layout: every position's sequence as its own batch entry, heads split the usual way
    n, length, positions, inner = q.shape
    def split(t):
        return t.permute(0, 2, 1, 3).reshape(n * positions, -1, heads, inner // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))  # (N*P, heads, L, d)
    return out.transpose(1, 2).reshape(n, positions, length, inner).permute(0, 2, 1, 3)


def test_strided_temporal_attention_equals_per_position_attention(monkeypatch):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 7, 30, 48) for _ in range(3))  # (B, F, H*W, heads*d)
    expected = per_position_attention(q, k, v, heads=3)
    got = attention(q, k, v, heads=3)
    assert got.shape == q.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(layers, "SDPA_MAX_BATCH", 16)  # chunked over both grid dims (batch 2 -> 2x1, heads 90 -> 6)
    torch.testing.assert_close(attention(q, k, v, heads=3), expected, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(layers, "SDPA_MAX_BATCH", 1)
    torch.testing.assert_close(attention(q, k, v, heads=3), expected, atol=1e-5, rtol=1e-5)


class OpNames(TorchDispatchMode):
    def __enter__(self):
        self.names = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_torch_with_and_without_autograd(bias):
    torch.manual_seed(0)
    layer = layers.Linear(48, 40, bias=bias)
    x = torch.randn(2, 5, 7, 48)
    with torch.no_grad():  # the oneDNN path on CPU
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer(x[..., ::2, :]), F.linear(x[..., ::2, :], layer.weight, layer.bias))
        half = layer.to(torch.bfloat16)(x.bfloat16())  # other dtypes: F.linear
        assert half.dtype == torch.bfloat16
    layer.float()
    if platform.machine() == "x86_64":  # float32 CPU inference goes to oneDNN (MKL's sgemm is slow on AMD)
        assert layers.ONEDNN
        with torch.no_grad(), OpNames() as seen:
            layer(x)
        assert "mkldnn._linear_pointwise.default" in seen.names, seen.names
    layer(x).sum().backward()  # with autograd it stays differentiable
    assert layer.weight.grad is not None and layer.weight.grad.shape == layer.weight.shape


def test_text_keys_and_values_are_projected_once_per_generation(ours):
    unet = ours.unet
    torch.manual_seed(0)
    x, t, text = torch.randn(2, 4, 3, 8, 8), torch.tensor(500), torch.randn(2, 77, unet.config.cross_attention_dim)
    kv = unet.text_kv(text)
    assert len(kv) == len(unet._cross_attentions()) > 1
    torch.testing.assert_close(unet(x, t, kv), unet(x, t, text))
    calls = []
    to_k = unet._cross_attentions()[-1].transformer_blocks[0].attn2.to_k
    handle = to_k.register_forward_hook(lambda *args: calls.append(args[1][0].shape))
    try:
        ours("a cat", num_inference_steps=3, num_frames=3, height=32, width=32, output_type="latent")
    finally:
        handle.remove()
    assert len(calls) == 1, f"the text's keys were projected {len(calls)} times for 3 steps"


def test_cpu_feed_forward_in_chunks_of_tokens_equals_the_whole(monkeypatch):
    torch.manual_seed(0)
    ff = layers.FeedForward(16)
    x = torch.randn(2, 37, 16)
    with torch.no_grad():
        whole = ff(x)
        calls = []
        monkeypatch.setattr(layers, "FF_CHUNK_BYTES", 10 * ff.net[0].proj.out_features * 4)  # 10 tokens per chunk
        hook = ff.net[0].register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
        chunked = ff(x)
        hook.remove()
    assert calls == [10] * 7 + [4]
    assert chunked.shape == whole.shape and torch.allclose(chunked, whole, atol=1e-6)
    with torch.enable_grad():  # training keeps one pass (autograd through in-place chunk writes is not wanted)
        calls.clear()
        hook = ff.net[0].register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
        ff(x.requires_grad_())
        hook.remove()
    assert calls == [2]
