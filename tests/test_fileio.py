"""The one atomic writer: complete or absent, umask permissions, only its own temp files cleaned up."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from vidfusion.media.fileio import TEMP_PREFIX, atomic_file, atomic_folder, remove_temp_files


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_and_folders_follow_the_umask(tmp_path, umask022):
    """Catches mkstemp / mkdtemp / safetensors' owner-only 0600 / 0700 kept on the published files (a shared
    output folder or a web server could not read them)."""
    import torch
    from safetensors.torch import save_file

    with atomic_file(tmp_path / "a.bin") as tmp:
        tmp.write_bytes(b"x")
    with atomic_folder(tmp_path / "ck") as tmp:
        (tmp / "sub").mkdir()
        save_file({"w": torch.zeros(2)}, tmp / "sub" / "w.safetensors")
    assert mode(tmp_path / "a.bin") == 0o644
    assert (mode(tmp_path / "ck"), mode(tmp_path / "ck" / "sub")) == (0o755, 0o755)
    assert mode(tmp_path / "ck" / "sub" / "w.safetensors") == 0o644
    os.umask(0o077)
    with atomic_file(tmp_path / "private.bin") as tmp:
        tmp.write_bytes(b"x")
    assert mode(tmp_path / "private.bin") == 0o600


def test_videos_follow_the_umask_and_a_failed_encode_leaves_nothing(tmp_path, umask022, monkeypatch):
    """Catches an empty temp file left behind when encoding fails (also with the default temp output)."""
    import av

    from vidfusion import export_to_video

    frames = np.zeros((2, 16, 16, 3), np.float32)
    for name in ("v.mp4", "v.webm", "v.gif"):
        assert mode(export_to_video(frames, tmp_path / name)) == 0o644

    def broken(*args, **kwargs):
        raise av.error.FFmpegError(1, "encoder exploded")

    monkeypatch.setattr(av, "open", broken)
    before = set(os.listdir(tmp_path))
    with pytest.raises(av.error.FFmpegError):
        export_to_video(frames, tmp_path / "w.mp4")
    assert set(os.listdir(tmp_path)) == before
    import tempfile

    temp_before = set(os.listdir(tempfile.gettempdir()))
    with pytest.raises(av.error.FFmpegError):
        export_to_video(frames)
    assert set(os.listdir(tempfile.gettempdir())) == temp_before


def test_failure_inside_leaves_no_file_and_no_temp(tmp_path):
    (tmp_path / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "keep.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "ck") as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("killed")
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"] and (tmp_path / "keep.txt").read_text() == "old"


def test_cleanup_removes_only_vidfusions_own_temp_names(tmp_path):
    """Catches `batch --out-dir .` deleting the user's hidden .*.mp4 / .*.tmp files."""
    from vidfusion.scale.batch import OutputDir

    mine = [tmp_path / f"{TEMP_PREFIX}a.mp4.x1.mp4", tmp_path / f"{TEMP_PREFIX}manifest.jsonl.x2.tmp"]
    theirs = [tmp_path / ".holiday.mp4", tmp_path / ".notes.tmp", tmp_path / ".cache.gif"]
    for path in mine + theirs:
        path.write_bytes(b"x")
    (tmp_path / f"{TEMP_PREFIX}ck.x3").mkdir()
    OutputDir(tmp_path)
    assert all(p.exists() for p in theirs) and not any(p.exists() for p in mine)
    assert not (tmp_path / f"{TEMP_PREFIX}ck.x3").exists() and remove_temp_files(tmp_path) == []
