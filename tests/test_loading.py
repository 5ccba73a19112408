"""Loading the published layout: variants, .bin, shards, hub ids, and every error path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vidfusion import CheckpointError, CheckpointNotFoundError, TextToVideoPipeline
from vidfusion.checkpoints.loading import choose_weight_files

from .conftest import make_reference_pipeline

GEN = dict(num_frames=2, height=32, width=32, num_inference_steps=2, output_type="latent")


def latents(pipe, seed=0):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a cat", generator=torch.Generator().manual_seed(seed), **GEN).frames


@pytest.fixture()
def copy_of(tiny_checkpoint, tmp_path):
    def make() -> Path:
        dst = tmp_path / "ckpt"
        shutil.copytree(tiny_checkpoint, dst)
        return dst

    return make


@pytest.fixture(scope="module")
def saved_variants(tmp_path_factory):
    """The same random weights written as fp16 variant, as .bin, and sharded, by diffusers."""
    root = tmp_path_factory.mktemp("variants")
    ref = make_reference_pipeline(root / "base")
    ref.save_pretrained(str(root / "bin"), safe_serialization=False)
    ref.save_pretrained(str(root / "sharded"), max_shard_size="20KB")
    ref.to(torch.float16).save_pretrained(str(root / "fp16"), variant="fp16")
    for name in ("fp16", "bin", "sharded"):
        shutil.copy(root / "base" / "scheduler" / "scheduler_config.json", root / name / "scheduler")
        for f in (root / "base" / "tokenizer").iterdir():
            shutil.copy(f, root / name / "tokenizer")
    return root


def test_fp16_variant_picks_fp16_files(saved_variants):
    folder = saved_variants / "fp16"
    assert any(".fp16." in p.name for p in (folder / "unet").iterdir())
    pipe = TextToVideoPipeline.from_pretrained(folder, variant="fp16", dtype=torch.float32)
    base = TextToVideoPipeline.from_pretrained(saved_variants / "base")
    rel = (latents(pipe) - latents(base)).abs().max() / latents(base).abs().max()
    assert 0 < rel < 2e-2  # fp16-rounded weights: close, not identical


def test_fp16_dtype_loads_half_weights(saved_variants):
    pipe = TextToVideoPipeline.from_pretrained(saved_variants / "fp16", variant="fp16", dtype=torch.bfloat16)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
    assert torch.isfinite(latents(pipe)).all()


@pytest.mark.parametrize("layout", ["bin", "sharded"])
def test_bin_and_sharded_give_identical_results(saved_variants, layout):
    folder = saved_variants / layout
    names = [p.name for p in (folder / "unet").iterdir()]
    if layout == "bin":
        assert any(n.endswith(".bin") for n in names)
    else:
        assert any(n.endswith(".index.json") for n in names)
    pipe = TextToVideoPipeline.from_pretrained(folder)
    base = TextToVideoPipeline.from_pretrained(saved_variants / "base")
    torch.testing.assert_close(latents(pipe), latents(base), rtol=0, atol=0)


def test_choose_weight_files_prefers_safetensors_and_variant():
    names = ["diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors",
             "diffusion_pytorch_model.fp16.safetensors", "config.json"]
    assert choose_weight_files(names, None, "x") == ["diffusion_pytorch_model.safetensors"]
    assert choose_weight_files(names, "fp16", "x") == ["diffusion_pytorch_model.fp16.safetensors"]
    with pytest.warns(UserWarning, match="no 'fp16' variant"):
        assert choose_weight_files(names[:2], "fp16", "x") == ["diffusion_pytorch_model.safetensors"]
    with pytest.raises(CheckpointNotFoundError, match="no weights found"):
        choose_weight_files(["config.json"], None, "x")


def test_video_to_video_index_loads(copy_of):
    folder = copy_of()
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "VideoToVideoSDPipeline"  # as cerspense/zeroscope_v2_XL publishes it
    (folder / "model_index.json").write_text(json.dumps(index))
    assert TextToVideoPipeline.from_pretrained(folder).unet is not None


def test_unknown_layout_names_the_file(copy_of):
    folder = copy_of()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(CheckpointError, match=r"model_index.json: unknown layout 'StableDiffusionPipeline'"):
        TextToVideoPipeline.from_pretrained(folder)


def test_missing_model_index_and_subfolder(copy_of):
    folder = copy_of()
    shutil.rmtree(folder / "vae")
    with pytest.raises(CheckpointNotFoundError, match="subfolder 'vae/' is missing"):
        TextToVideoPipeline.from_pretrained(folder)
    (folder / "model_index.json").unlink()
    with pytest.raises(FileNotFoundError, match="model_index.json is missing"):
        TextToVideoPipeline.from_pretrained(folder)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextToVideoPipeline.from_pretrained(tmp_path / "nope")


def test_truncated_weights_name_the_file(copy_of):
    folder = copy_of()
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.safetensors: the file is truncated or corrupt"):
        TextToVideoPipeline.from_pretrained(folder)


def test_corrupt_bin_names_the_file(copy_of):
    folder = copy_of()
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.bin: the file is truncated or corrupt"):
        TextToVideoPipeline.from_pretrained(folder)


def _edit_unet(folder: Path, edit) -> None:
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


def test_missing_unexpected_and_wrong_shape_keys_are_named(copy_of):
    folder = copy_of()

    def edit(state):
        del state["conv_in.weight"]
        state["extra.weight"] = torch.zeros(1)
        state["conv_out.bias"] = torch.zeros(7)

    _edit_unet(folder, edit)
    with pytest.raises(CheckpointError) as err:
        TextToVideoPipeline.from_pretrained(folder)
    message = str(err.value)
    assert "missing keys: conv_in.weight" in message
    assert "unexpected keys: extra.weight" in message
    assert "conv_out.bias (7,) != (4,)" in message


def test_bad_config_names_the_file(copy_of):
    folder = copy_of()
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    cfg["down_block_types"] = ["SomethingElse3D", "DownBlock3D"]
    (folder / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unet/config.json: unsupported down block type 'SomethingElse3D'"):
        TextToVideoPipeline.from_pretrained(folder)
    (folder / "unet" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON"):
        TextToVideoPipeline.from_pretrained(folder)


def test_tokenizer_json_only_folder_loads(copy_of, ours):
    folder = copy_of()
    ours.tokenizer.save_pretrained(str(folder / "tokenizer_fast"))
    tok = folder / "tokenizer"
    shutil.rmtree(tok)
    tok.mkdir()
    shutil.copy(folder / "tokenizer_fast" / "tokenizer.json", tok)
    shutil.copy(folder / "tokenizer_fast" / "tokenizer_config.json", tok)
    pipe = TextToVideoPipeline.from_pretrained(folder)
    assert pipe.tokenizer("a cat").input_ids == ours.tokenizer("a cat").input_ids


def test_hub_id_without_network_says_how_to_use_a_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"hf download damo-vilab/text-to-video-ms-1.7b.*HF_HUB_OFFLINE=1"):
        TextToVideoPipeline.from_pretrained("damo-vilab/text-to-video-ms-1.7b")


def test_dtype_must_be_a_float_dtype(tiny_checkpoint):
    with pytest.raises(ValueError, match="floating torch dtype"):
        TextToVideoPipeline.from_pretrained(tiny_checkpoint, dtype=torch.int8)


def test_hub_download_list_takes_only_what_the_variant_needs():
    from vidfusion.checkpoints.loading import wanted_hub_files

    files = ["model_index.json", "README.md", "scheduler/scheduler_config.json", "tokenizer/vocab.json",
             "tokenizer/merges.txt", "tokenizer/tokenizer_config.json", "text_encoder/config.json",
             "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors", "text_encoder/pytorch_model.bin",
             "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
             "vae/diffusion_pytorch_model.fp16.safetensors",
             "unet/config.json", "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
             "unet/diffusion_pytorch_model.safetensors.index.json",
             "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
             "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
             "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
             "unet/diffusion_pytorch_model-00002-of-00002.safetensors"]
    indexes = []

    def read_index(name):
        indexes.append(name)
        stem = "diffusion_pytorch_model.fp16" if ".fp16." in name else "diffusion_pytorch_model"
        return {"weight_map": {f"w{i}": f"{stem}-0000{i % 2 + 1}-of-00002.safetensors" for i in range(4)}}

    fp16 = wanted_hub_files(files, "fp16", "org/repo", read_index)
    assert "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors" in fp16
    assert "unet/diffusion_pytorch_model-00001-of-00002.safetensors" not in fp16
    assert "text_encoder/model.fp16.safetensors" in fp16 and "text_encoder/model.safetensors" not in fp16
    assert "README.md" not in fp16 and "text_encoder/pytorch_model.bin" not in fp16
    assert indexes == ["unet/diffusion_pytorch_model.safetensors.index.fp16.json"]
    full = wanted_hub_files(files, None, "org/repo", read_index)
    assert "unet/diffusion_pytorch_model-00002-of-00002.safetensors" in full
    assert not any(".fp16." in f for f in full)
    assert {"tokenizer/vocab.json", "scheduler/scheduler_config.json", "model_index.json"} <= set(full)
