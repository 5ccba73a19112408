"""Image-conditioned videos (training-free): the conditioned frames' latents are the picture's latent noised to each
step's level, and exactly the picture's latent at the end; weight 0 leaves the video untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vidfusion.sampling.samplers import start_state
from vidfusion.sampling.schedules import NoiseSchedule, sampler_options

PICTURE = (np.random.default_rng(3).random((16, 16, 3)) * 255).astype(np.uint8)
ARGS = dict(prompt="a red car", num_frames=4, height=16, width=16, num_inference_steps=3, output_type="latent")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def picture_latent(pipe, picture=PICTURE):
    pixels = torch.from_numpy(picture.astype(np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1
    mean, _ = pipe.vae.encode(pixels)
    return mean.float() * pipe.vae.config.scaling_factor  # (1, C, h, w)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp-2m", "euler-ancestral"])
def test_weight_zero_is_todays_video(ours, sampler):
    """Catches conditioning that disturbs the generator stream or the other frames: weight 0 is bit-identical."""
    plain = ours(generator=gen(), sampler=sampler, **ARGS).frames
    zero = ours(generator=gen(), sampler=sampler, image=PICTURE, image_weights=[0, 0, 0, 0], **ARGS).frames
    assert torch.equal(plain, zero)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp-2m", "lcm", "unipc"])
def test_conditioned_latents_follow_the_noised_picture(ours, sampler):
    """After each step the first frame's latents are the picture's latent noised to the next step's level (in the
    sampler's space), and the picture's latent itself at the end; the last frame follows `last_image`."""
    seen = []
    out = ours(generator=gen(), sampler=sampler, image=PICTURE, last_image=PICTURE[::-1].copy(),
               callback_on_step_end=lambda p, s, t, st: seen.append(st["latents"].clone()), **ARGS).frames
    z = picture_latent(ours)
    z_last = picture_latent(ours, PICTURE[::-1].copy())
    assert torch.allclose(out[:, :, 0], z, atol=1e-5) and torch.allclose(out[:, :, -1], z_last, atol=1e-5)
    base, preset = _base(sampler)
    schedule = NoiseSchedule.create(sampler_options(base, dict(ours.scheduler.config), preset), 3)
    from vidfusion.pipelines.conditioning import _own_noise

    noise = _own_noise((1, 4, 4, 8, 8), gen(), torch.device("cpu"))
    for step, latents in enumerate(seen[:-1]):
        expected = start_state(base, schedule, z[:, :, None].expand(-1, -1, 4, -1, -1), noise, step + 1)
        assert torch.allclose(latents[:, :, 0], expected[:, :, 0], atol=1e-5), step
    assert not torch.allclose(out[:, :, 1], z, atol=1e-2)  # the other frames are generated


def test_unipc_corrector_keeps_the_picture_the_model_sees(ours):
    """UniPC corrects step i's latents from the latents before step i-1 once the model has seen step i: catches a
    replacement done where the corrector overwrites it before the model call (the model at every step from the
    second on must see the first frame as the picture noised to that step's level, in every guidance half)."""
    seen = []
    handle = ours.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0][:, :, 0].clone()))
    try:
        out = ours(generator=gen(), sampler="unipc", image=PICTURE, **{**ARGS, "num_inference_steps": 4}).frames
    finally:
        handle.remove()
    from vidfusion.pipelines.conditioning import _own_noise

    z = picture_latent(ours)
    base, preset = _base("unipc")
    schedule = NoiseSchedule.create(sampler_options(base, dict(ours.scheduler.config), preset), 4)
    noise = _own_noise((1, 4, 4, 8, 8), gen(), torch.device("cpu"))
    assert len(seen) == 4
    for step in range(1, 4):
        expected = start_state(base, schedule, z[:, :, None].expand(-1, -1, 4, -1, -1), noise, step)[:, :, 0]
        for half in seen[step].split(1):  # (1, C, h, w) for the unconditional and the text half
            assert torch.allclose(half, expected, atol=1e-5), step
    assert torch.allclose(out[:, :, 0], z, atol=1e-5)


def _base(sampler):
    from vidfusion.sampling.schedules import resolve_sampler

    base, preset = resolve_sampler(sampler)
    return base, preset


def test_frames_decode_to_the_picture_and_errors(ours):
    frames = ours(generator=gen(), image=PICTURE, **{**ARGS, "output_type": "np"}).frames[0]
    decoded = ours.decode_latents(picture_latent(ours)[:, :, None])[0, 0].permute(1, 2, 0).numpy() / 2 + 0.5
    assert np.abs(frames[0] - decoded.clip(0, 1)).max() < 1e-4
    with pytest.raises(ValueError, match="frame 9"):
        ours(images={9: PICTURE}, **ARGS)
    with pytest.raises(ValueError, match="pndm"):
        ours(image=PICTURE, sampler="pndm", **ARGS)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ours(image="/nope.png", **ARGS)


def test_extend_joins_the_new_frames_after_the_input(ours, tiny_checkpoint, tmp_path):
    """The output is the input followed by the new clip minus its first `overlap` frames, and that clip is the one
    conditioned on the input's last frames (catches an off-by-overlap join or an unconditioned continuation)."""
    from vidfusion import export_to_video
    from vidfusion.media.video_io import read_video
    from vidfusion.pipelines.conditioning import extend

    source = np.random.default_rng(5).random((8, 16, 16, 3)).astype(np.float32)
    path = export_to_video(source, tmp_path / "in.mp4", fps=6)
    decoded = read_video(path).astype(np.float32) / 255
    frames, ran = extend(ours, path, "a red car", num_frames=6, overlap=2, num_inference_steps=2,
                         generator=gen(1))
    assert frames.shape == (12, 16, 16, 3) and ran["num_frames"] == 6 and ran["overlap"] == 2  # the generated clip
    assert np.array_equal(frames[:8], decoded)
    direct = ours("a red car", num_frames=6, height=16, width=16, num_inference_steps=2, generator=gen(1),
                  images={0: decoded[6], 1: decoded[7]}).frames[0]
    assert np.array_equal(frames[8:], direct[2:])
    from vidfusion.cli.main import main as cli_main

    out = tmp_path / "more.mp4"
    assert cli_main(["extend", str(path), "a red car", "--model", str(tiny_checkpoint), "--frames", "6",
                     "--overlap", "2", "--steps", "2", "--seed", "1", "--out", str(out), "--quiet"]) == 0
    assert len(read_video(out)) == 12
    from vidfusion.media.video_io import read_metadata as meta_of

    meta = meta_of(out)  # honest: the kind, its input, the overlap and the generated clip's frames (not the file's)
    assert (meta["kind"], meta["extended"], meta["overlap"], meta["num_frames"]) == ("extend", str(path), 2, 6)
    again = tmp_path / "again.mp4"
    assert cli_main(["generate", "--from", str(out), "--out", str(again), "--quiet"]) == 2  # not a plain clip
    assert not again.exists()
    image_out = tmp_path / "img.mp4"
    assert cli_main(["generate", "a red car", "--model", str(tiny_checkpoint), "--frames", "4", "--steps", "2",
                     "--height", "16", "--width", "16", "--image", str(_png(tmp_path)), "--out", str(image_out),
                     "--quiet"]) == 0
    from vidfusion.media.video_io import read_metadata

    assert read_metadata(image_out)["image"] == str(_png(tmp_path))


def _png(folder):
    from PIL import Image

    path = folder / "first.png"
    Image.fromarray(PICTURE).save(path)
    return path


def test_image_init_strength_starts_from_the_still_picture(ours):
    """image_init_strength: the first picture over every frame, noised as video-to-video starts (catches a start
    from plain noise): strength 0 runs no step and every frame is the picture's latent; 0.5 with 4 DDIM steps
    (751, 501, 251, 1) starts at 251."""
    args = {**ARGS, "num_inference_steps": 4, "sampler": "ddim"}
    still = ours(generator=gen(), image=PICTURE, image_init_strength=0.0, **args).frames
    z = picture_latent(ours)
    assert all(torch.allclose(still[:, :, f], z, atol=1e-5) for f in range(4))
    seen = []
    hook = ours.unet.register_forward_pre_hook(lambda m, a: seen.append(int(a[1])))
    try:
        ours(generator=gen(), image=PICTURE, image_init_strength=0.5, **args)
    finally:
        hook.remove()
    assert seen == [251, 1]
    with pytest.raises(ValueError, match="image_init_strength"):
        ours(image_init_strength=0.5, **args)  # no picture
