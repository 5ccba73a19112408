"""export_to_video: decode the written file back with PyAV and check what came out."""

from __future__ import annotations

import os

import av
import numpy as np
import pytest
import torch
from PIL import Image

from vidfusion import export_to_video
from vidfusion.utils import export_to_video as utils_export


def probe(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return stream.codec_context.name, stream.codec_context.pix_fmt, float(stream.average_rate), frames


def clip(frames=6, h=32, w=48):
    t = np.linspace(0, 1, frames, dtype=np.float32)[:, None, None, None]
    img = np.broadcast_to(np.linspace(0, 1, w, dtype=np.float32)[None, None, :, None], (frames, h, w, 3))
    return np.clip(img * 0.5 + t * 0.5, 0, 1).astype(np.float32)


@pytest.mark.parametrize("suffix,codec", [(".mp4", "h264"), (".webm", "vp9"), (".gif", "gif")])
def test_export_formats_decode_back(tmp_path, suffix, codec):
    path = export_to_video(clip(), tmp_path / f"out{suffix}", fps=10)
    name, pix_fmt, fps, frames = probe(path)
    assert name == codec
    assert len(frames) == 6 and frames[0].shape == (32, 48, 3)
    if suffix != ".gif":
        assert pix_fmt == "yuv420p" and fps == pytest.approx(10)
        # content survives the encode: mean brightness of the last frame is higher than the first
        assert frames[-1].mean() > frames[0].mean() + 20


def test_default_path_is_a_temp_mp4():
    path = export_to_video(clip(frames=3))
    try:
        assert path.endswith(".mp4") and probe(path)[0] == "h264"
    finally:
        os.unlink(path)


def test_odd_sizes_are_padded_for_yuv420(tmp_path):
    _, pix_fmt, _, frames = probe(export_to_video(clip(h=33, w=45), tmp_path / "odd.mp4"))
    assert pix_fmt == "yuv420p" and frames[0].shape == (34, 46, 3)


def test_accepts_batches_of_one_tensors_pil_and_uint8(tmp_path):
    video = clip(frames=4)
    batch = video[None]  # what `pipe(prompt).frames` returns for one prompt
    assert len(probe(export_to_video(batch, tmp_path / "a.mp4"))[3]) == 4
    pt = torch.from_numpy(video).permute(0, 3, 1, 2)  # (F, 3, H, W)
    assert len(probe(export_to_video(pt, tmp_path / "b.mp4"))[3]) == 4
    pil = [Image.fromarray((f * 255).astype(np.uint8)) for f in video]
    assert len(probe(export_to_video(pil, tmp_path / "c.mp4"))[3]) == 4
    assert len(probe(export_to_video([pil], tmp_path / "d.mp4"))[3]) == 4
    assert len(probe(utils_export((video * 255).astype(np.uint8), tmp_path / "e.mp4"))[3]) == 4


def test_batch_of_several_videos_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"batch of 2 videos.*frames\[0\]"):
        export_to_video(np.stack([clip(), clip()]), tmp_path / "x.mp4")
    assert not list(tmp_path.iterdir())


def test_bad_extension_and_failure_leave_no_file(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unsupported video extension"):
        export_to_video(clip(), tmp_path / "x.avi")
    def broken(*args, **kwargs):
        raise RuntimeError("encoder exploded")

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", broken)
    with pytest.raises(RuntimeError, match="encoder exploded"):
        export_to_video(clip(), tmp_path / "y.mp4")
    assert not list(tmp_path.iterdir())
