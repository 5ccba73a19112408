"""Per-request inputs of the service: LoRAs named from --lora-dir with weights, and uploaded videos
(video-to-video, upscale), each checked against the Python API doing the same thing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vidfusion.media.video_io import export_to_video, read_metadata, read_video
from vidfusion.pipelines.text_to_video import TextToVideoPipeline
from vidfusion.pipelines.video2video import VideoToVideoPipeline
from vidfusion.serve.jobs import FAILED, QUEUED, JobStore
from vidfusion.serve.render import JobRunner, check_lora_names

from .serve_helpers import SMALL, Server, wait_for

LORA_LAYERS = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.resnets.0.conv1",
               "down_blocks.0.temp_attentions.0.transformer_blocks.0.attn1.to_v", "mid_block.resnets.0.conv1"]


def write_lora(pipe: TextToVideoPipeline, path, seed: int) -> None:
    """A diffusers-format LoRA (rank 4) over a few UNet layers, strong enough to change the video."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name in LORA_LAYERS:
        w = pipe.unet.get_submodule(name).weight
        kernel = tuple(w.shape[2:])
        state[f"unet.{name}.lora_A.weight"] = torch.randn((4, w.shape[1], *kernel), generator=g) / w[0].numel() ** .5
        state[f"unet.{name}.lora_B.weight"] = torch.randn((w.shape[0], 4, *([1] * len(kernel))), generator=g)
    save_file(state, str(path))


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    p = TextToVideoPipeline.from_pretrained(tiny_checkpoint)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def lora_dir(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    write_lora(pipe, folder / "motion-pan.safetensors", 1)
    write_lora(pipe, folder / "style.safetensors", 2)
    (folder / "notes.txt").write_text("not a LoRA")
    return folder


@pytest.fixture(scope="module")
def server(tiny_checkpoint, lora_dir, tmp_path_factory):
    srv = Server(tiny_checkpoint, tmp_path_factory.mktemp("serve-inputs") / "data", "--lora-dir", str(lora_dir),
                 "--max-upload-mb", "1").start()
    yield srv
    srv.stop()


def frames_of(content: bytes, tmp_path, name: str = "v.mp4") -> np.ndarray:
    (tmp_path / name).write_bytes(content)
    return read_video(tmp_path / name)


def encoded(frames: np.ndarray, tmp_path, name: str = "ref.mp4", fps: int = 8) -> np.ndarray:
    """Frames through the same encoder the service uses (at the same frame rate), decoded again."""
    return read_video(export_to_video(frames, tmp_path / name, fps=fps))


def test_lora_per_request_equals_set_adapters(server, pipe, lora_dir, tmp_path):
    """A job naming two LoRAs with weights makes the video pipe.set_adapters gives with those weights; the next job
    without LoRAs is the plain video again (a server that kept the last job's adapters, ignored the weights or
    swapped the names fails here)."""
    with server.client() as c:
        assert c.get("/v1/loras").json()["data"] == [{"name": "motion-pan"}, {"name": "style"}]
        request = {**SMALL, "prompt": "a pan", "seed": 11,
                   "loras": [{"name": "motion-pan", "weight": 0.8}, {"name": "style", "weight": -0.5}]}
        with_loras = wait_for(c, c.post("/v1/videos", json=request).json()["id"])
        plain = wait_for(c, c.post("/v1/videos", json={**SMALL, "prompt": "a pan", "seed": 11}).json()["id"])
        got = frames_of(c.get(f"/v1/videos/{with_loras['id']}/content").content, tmp_path, "a.mp4")
        got_plain = frames_of(c.get(f"/v1/videos/{plain['id']}/content").content, tmp_path, "b.mp4")
    call = dict(num_frames=SMALL["num_frames"], height=SMALL["height"], width=SMALL["width"],
                num_inference_steps=SMALL["num_inference_steps"], guidance_scale=SMALL["guidance_scale"],
                output_type="np")
    pipe.load_lora_weights(lora_dir / "motion-pan.safetensors", adapter_name="motion-pan")
    pipe.load_lora_weights(lora_dir / "style.safetensors", adapter_name="style")
    pipe.set_adapters(["style", "motion-pan"], [-0.5, 0.8])
    expected = pipe("a pan", generator=torch.Generator().manual_seed(11), **call).frames[0]
    pipe.unload_lora_weights()
    expected_plain = pipe("a pan", generator=torch.Generator().manual_seed(11), **call).frames[0]
    np.testing.assert_array_equal(got, encoded(expected, tmp_path))
    np.testing.assert_array_equal(got_plain, encoded(expected_plain, tmp_path, "plain.mp4"))
    assert np.abs(got.astype(int) - got_plain.astype(int)).max() > 10


def test_unknown_or_repeated_lora_is_a_422_listing_the_available_ones(server):
    with server.client() as c:
        r = c.post("/v1/videos", json={**SMALL, "prompt": "x", "loras": [{"name": "nope", "weight": 1}]})
        assert r.status_code == 422
        detail = r.json()["detail"][0]
        assert detail["loc"][-1] == "loras" and "motion-pan, style" in detail["msg"]
        r = c.post("/v1/videos", json={**SMALL, "prompt": "x", "loras": [{"name": "style"}, {"name": "style"}]})
        assert r.status_code == 422 and "twice" in r.json()["detail"][0]["msg"]
        r = c.post("/v1/videos", json={**SMALL, "prompt": "x", "loras": [{"name": "style", "weight": 1e9}]})
        assert r.status_code == 422


def test_switching_loras_between_jobs_never_reloads_them(pipe, lora_dir, monkeypatch):
    """After start-up a runner only re-merges: loading an adapter again between jobs fails this test."""
    named = {p.stem: (str(p), str(p)) for p in sorted(lora_dir.glob("*.safetensors"))}
    runner = JobRunner(pipe, "tiny", named_loras=named)
    try:
        def no_reload(*args, **kwargs):
            raise AssertionError("a LoRA was loaded again")

        monkeypatch.setattr(pipe, "load_lora_weights", no_reload)
        params = {**SMALL, "prompt": "x", "seed": 1, "fps": 8}
        results = [runner.run({**params, "loras": loras}, {}, lambda *a: True).settings for loras in
                   ([{"name": "style", "weight": 1.0}], [{"name": "motion-pan", "weight": 0.5}], [])]
        assert [s.get("loras") for s in results] == [[{"path": named["style"][1], "weight": 1.0}],
                                                      [{"path": named["motion-pan"][1], "weight": 0.5}], None]
    finally:
        monkeypatch.undo()
        pipe.unload_lora_weights()


def test_video_upload_is_video_to_video_with_the_inputs_kept(server, pipe, tmp_path):
    """A multipart `video` + strength runs video-to-video: the same video as VideoToVideoPipeline with that strength
    and seed (guidance 15, the video-to-video default; the input's frame rate); num_frames takes the first frames;
    width/height upscale; the input is kept with the job."""
    rng = np.random.default_rng(0)
    source = (np.clip(np.cumsum(rng.normal(size=(4, 32, 32, 3)), axis=0) * 0.1 + 0.5, 0, 1) * 255).astype(np.uint8)
    mp4 = export_to_video(source, tmp_path / "input.mp4", fps=12)
    data = open(mp4, "rb").read()
    with server.client() as c:
        params = {"prompt": "restyled", "seed": 5, "num_inference_steps": 3, "strength": 0.7, "num_frames": 3}
        r = c.post("/v1/videos/upload", data={"params": json.dumps(params)}, files={"video": ("in.mp4", data)})
        assert r.status_code == 202, r.text
        job = wait_for(c, r.json()["id"])
        assert job["status"] == "succeeded", job["error"]
        assert (job["params"]["guidance_scale"], job["params"]["fps"], job["params"]["num_frames"]) == (15.0, 12, 3)
        assert job["params"]["video"].startswith(str(server.data_dir / "inputs"))
        assert open(job["params"]["video"], "rb").read() == data
        content = c.get(f"/v1/videos/{job['id']}/content").content
        got = frames_of(content, tmp_path)
        (tmp_path / "out.mp4").write_bytes(content)
        recorded = read_metadata(tmp_path / "out.mp4")  # `generate --from` on the server remakes it from these
        assert (recorded["init_video"], recorded["strength"], recorded["num_frames"]) == (job["params"]["video"],
                                                                                           0.7, 3)
        up = {"prompt": "bigger", "seed": 5, "num_inference_steps": 2, "strength": 0.3, "height": 64, "width": 64}
        upscaled = wait_for(c, c.post("/v1/videos/upload", data={"params": json.dumps(up)},
                                      files={"video": ("in.mp4", data)}).json()["id"])
        assert upscaled["status"] == "succeeded" and upscaled["params"]["num_frames"] == 4
        assert frames_of(c.get(f"/v1/videos/{upscaled['id']}/content").content, tmp_path, "u.mp4").shape == \
            (4, 64, 64, 3)
    v2v = VideoToVideoPipeline.from_pipe(pipe)
    expected = v2v("restyled", video=read_video(mp4)[:3], strength=0.7, num_inference_steps=3,
                   generator=torch.Generator().manual_seed(5), output_type="np").frames[0]
    np.testing.assert_array_equal(got, encoded(expected, tmp_path, fps=12))


def test_bad_video_uploads(server):
    """413 over --max-upload-mb, 422 naming the field for a file that is not a video, more frames than the video has,
    and strength without a video."""
    with server.client() as c:
        params = json.dumps({"prompt": "x"})
        big = c.post("/v1/videos/upload", data={"params": params}, files={"video": ("v.mp4", b"0" * (2 * 2**20))})
        assert big.status_code == 413 and "max-upload-mb" in big.text
        bad = c.post("/v1/videos/upload", data={"params": params}, files={"video": ("v.mp4", b"not a video")})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][-1] == "video"
        frames = (np.random.default_rng(1).random((2, 16, 16, 3)) * 255).astype(np.uint8)
        path = export_to_video(frames, str(server.data_dir.parent / "two.mp4"))
        long = c.post("/v1/videos/upload", data={"params": json.dumps({"prompt": "x", "num_frames": 5})},
                      files={"video": ("two.mp4", open(path, "rb").read())})
        assert long.status_code == 422 and "has 2 frames" in long.json()["detail"][0]["msg"]
        no_video = c.post("/v1/videos", json={**SMALL, "prompt": "x", "strength": 0.5})
        assert no_video.status_code == 422 and no_video.json()["detail"][0]["loc"][-1] == "strength"


def test_a_job_whose_worker_dies_three_times_fails(tmp_path):
    """JobStore.requeue: a dead worker's job goes back to the queue with its seed, and fails on the third death
    (a store that requeued forever, or reset the seed, fails here)."""
    store = JobStore(tmp_path)
    job, _ = store.submit({"prompt": "x", "num_inference_steps": 2})
    for attempt in (1, 2):
        claimed = store.claim()
        assert claimed.id == job.id and claimed.attempts == attempt
        assert store.requeue(job.id, "ActorDiedError: killed") == QUEUED
    store.claim()
    assert store.requeue(job.id, "ActorDiedError: killed") == FAILED
    final = store.get(job.id)
    assert final.params["seed"] == job.params["seed"]
    assert final.error == "WorkerDied: its worker died 3 times (ActorDiedError: killed)"
    assert store.requeue(job.id, "again") is None


def test_upload_retry_with_its_key_is_the_same_job_and_refused_uploads_leave_no_file(server):
    """Inputs are named by content: the same upload sent again with its Idempotency-Key returns the first job (a
    random file name made it a 409 'other parameters'); a refused upload (422, 409) removes what it stored."""
    frames = (np.random.default_rng(4).random((2, 16, 16, 3)) * 255).astype(np.uint8)
    data = open(export_to_video(frames, str(server.data_dir.parent / "retry.mp4")), "rb").read()
    inputs = server.data_dir / "inputs"
    params = json.dumps({"prompt": "retry", "num_inference_steps": 2, "seed": 1})
    with server.client() as c:
        def send(body=params, key="upload-key-1"):
            return c.post("/v1/videos/upload", data={"params": body}, files={"video": ("r.mp4", data)},
                          headers={"Idempotency-Key": key})

        first = send()
        assert first.status_code == 202, first.text
        before = sorted(inputs.iterdir())
        again = send()
        assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
        conflict = send(json.dumps({"prompt": "other", "num_inference_steps": 2}))
        assert conflict.status_code == 409
        other = (np.random.default_rng(5).random((2, 16, 16, 3)) * 255).astype(np.uint8)
        refused = c.post("/v1/videos/upload", data={"params": json.dumps({"prompt": "x", "num_frames": 9})},
                         files={"video": ("o.mp4", open(export_to_video(other, str(server.data_dir.parent /
                                                                                   "o.mp4")), "rb").read())})
        assert refused.status_code == 422
        assert sorted(inputs.iterdir()) == before
        stray = c.post("/v1/videos/upload", data={"params": params, "strength": "0.5"})
        assert stray.status_code == 422 and "inside `params`" in stray.json()["detail"][0]["msg"]
        wait_for(c, first.json()["id"])


def test_a_refused_upload_never_removes_a_file_that_another_request_holds_or_a_job_names(tmp_path):
    """Two requests with the same content share one input file. The one refused must not remove it while the other
    is in flight (it checked that the file exists and is about to submit its job), nor once a job names it; the
    last refused holder of an unnamed file removes it (a refused request leaves nothing behind)."""
    store = JobStore(tmp_path)
    data = b"the same uploaded bytes"
    path, new = store.hold_input(data, ".mp4")  # request A stores the file
    assert new
    path.write_bytes(data)
    again, new_again = store.hold_input(data, ".mp4")  # request B: same content, same file, already there
    assert again == path and not new_again
    store.release_input(path, refused=True)  # A refused while B is in flight
    assert path.exists()
    store.release_input(path, refused=True)  # B refused too: nobody holds it, no job names it
    assert not path.exists()
    path, _ = store.hold_input(data, ".mp4")
    path.write_bytes(data)
    job_path, _ = store.hold_input(data, ".mp4")
    store.submit({"prompt": "named", "init_video": str(job_path)})  # B's job names the file, then B lets go
    store.release_input(job_path, refused=False)
    store.release_input(path, refused=True)  # A refused after B's job was accepted
    assert path.exists()
    store.close()


def test_lora_dir_names_must_differ_from_every_job_adapters():
    check_lora_names(["style"], [("/loras/motion.safetensors", 1.0)], turbo=False)
    with pytest.raises(ValueError, match="'motion'.*rename the file"):
        check_lora_names(["motion"], [("/loras/motion.safetensors", 1.0)], turbo=False)
    with pytest.raises(ValueError, match="'t2v-turbo'"):
        check_lora_names(["t2v-turbo"], [], turbo=True)


def test_preview_decoder_gives_real_preview_pictures(tiny_checkpoint, pipe, tmp_path):
    """`serve --preview-decoder`: the live preview is the tiny decoder's picture of the middle frame (after the last
    step: of the final latents), at the video's size — not the latents' colours enlarged in 8x8 blocks."""
    import io

    from diffusers import AutoencoderTiny
    from PIL import Image

    from vidfusion.checkpoints.tiny_decoder import load_tiny_decoder
    from vidfusion.models.tiny_vae import preview_frames

    torch.manual_seed(0)
    # the tiny checkpoint's VAE upsamples 2x (not 8x): a TAESD of two blocks matches it
    taesd = AutoencoderTiny(decoder_block_out_channels=(16, 16), encoder_block_out_channels=(16, 16),
                            num_decoder_blocks=(1, 1), num_encoder_blocks=(1, 1))
    taesd.save_pretrained(tmp_path / "taesd")
    srv = Server(tiny_checkpoint, tmp_path / "data", "--preview-decoder", str(tmp_path / "taesd")).start()
    request = {**SMALL, "num_frames": 3, "prompt": "a preview", "seed": 21}
    try:
        with srv.client() as c:
            job = wait_for(c, c.post("/v1/videos", json=request).json()["id"])
            png = c.get(f"/v1/videos/{job['id']}/preview").content
    finally:
        srv.stop()
    got = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    latents = pipe(request["prompt"], num_frames=3, height=32, width=32, num_inference_steps=2, guidance_scale=7.5,
                   generator=torch.Generator().manual_seed(21), output_type="latent").frames
    expected = preview_frames(load_tiny_decoder(tmp_path / "taesd"), latents[:, :, 1:2])[0, 0]
    assert got.shape == (32, 32, 3)
    np.testing.assert_array_equal(got, expected)


def test_step_caching_per_request(server, pipe, tmp_path):
    """`cache` fields run the job with step caching: the same video as the pipeline with cache="deepcache" (a
    server that dropped the fields would make the uncached video); a few-step sampler with cache is a 422."""
    request = {**SMALL, "num_inference_steps": 6, "prompt": "cached", "seed": 8, "cache": "deepcache",
               "cache_interval": 2}
    with server.client() as c:
        job = wait_for(c, c.post("/v1/videos", json=request).json()["id"])
        assert job["status"] == "succeeded", job["error"]
        got = frames_of(c.get(f"/v1/videos/{job['id']}/content").content, tmp_path)
        refused = c.post("/v1/videos", json={**request, "sampler": "mcm"})
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"][-1] == "cache"
        deep = c.post("/v1/videos", json={**request, "cache_branch": 4})  # the tiny UNet has branches 0..3
        assert deep.status_code == 422 and deep.json()["detail"][0]["loc"][-1] == "cache_branch"
    call = dict(num_frames=SMALL["num_frames"], height=SMALL["height"], width=SMALL["width"], num_inference_steps=6,
                guidance_scale=SMALL["guidance_scale"], output_type="np")
    cached = pipe("cached", generator=torch.Generator().manual_seed(8), cache="deepcache", cache_interval=2,
                  **call).frames[0]
    plain = pipe("cached", generator=torch.Generator().manual_seed(8), **call).frames[0]
    np.testing.assert_array_equal(got, encoded(cached, tmp_path))
    assert not np.array_equal(encoded(plain, tmp_path, "plain.mp4"), got)
