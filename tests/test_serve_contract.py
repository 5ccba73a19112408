"""The service's OpenAPI schema is its contract: every operation lists every status it can answer with the one
error body, the upload route's form fields and files are in it, a field a route refuses is not in its schema, no
body gives a 5xx, and schemathesis (`--checks all`, generated valid and invalid requests, stateful sequences)
against the running service finds nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from .serve_helpers import Server

TOKEN = "contract-token"
CONFIG = Path(__file__).parent / "data" / "schemathesis.toml"


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    srv = Server(tiny_checkpoint, tmp_path_factory.mktemp("contract") / "data", "--max-frames", "8",
                 "--max-pixels", str(64 * 64), "--max-upload-mb", "1", token=TOKEN).start()
    yield srv
    srv.stop()


def test_no_body_gives_a_5xx(server):
    """Catches the 500s of FastAPI's validation handler echoing bytes: a non-UTF-8 octet-stream body and a multipart
    form with a video sent to the JSON route answer 415; non-UTF-8 bytes labelled JSON answer 400, one line."""
    with server.client() as c:
        r = c.post("/v1/videos", content=b"\xff\xfe\x00garbage", headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 415 and "application/json" in r.json()["detail"]
        r = c.post("/v1/videos", data={"prompt": "a cat"}, files={"video": ("clip.mp4", b"\x00\x01", "video/mp4")})
        assert r.status_code == 415
        r = c.post("/v1/videos", content=b'{"prompt": "\xff\xfe"}', headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and isinstance(r.json()["detail"], str)
        r = c.post("/v1/videos/upload", json={"prompt": "a cat"})
        assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]


def test_allow_lists_every_method_of_the_path(server):
    """Catches `Allow: GET` on /v1/videos/{id}, which also takes DELETE."""
    with server.client() as c:
        r = c.request("PUT", "/v1/videos/abc")
        assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"DELETE", "GET"}


def test_the_schema_states_the_contract(server):
    """Catches routes whose schema omits statuses they answer (404, 401, 409, 413, 415, 429), a JSON route that
    offers `strength` and then refuses it, and an upload route documented without its form fields."""
    import httpx

    schema = httpx.get(server.url + "/openapi.json").json()
    paths = schema["paths"]
    for path, operations in paths.items():
        for method, operation in operations.items():
            if path.startswith("/v1"):
                assert {"400", "401", "403"} <= set(operation["responses"]), (method, path)
                assert operation["responses"]["401"]["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/Error"}
    assert "404" in paths["/v1/videos/{job_id}"]["get"]["responses"]
    assert "409" in paths["/v1/videos/{job_id}"]["delete"]["responses"]
    create = paths["/v1/videos"]["post"]
    assert {"409", "413", "415", "422", "429"} <= set(create["responses"])
    body = schema["components"]["schemas"][create["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                                          .split("/")[-1]]
    assert "strength" not in body["properties"]
    assert body["properties"]["num_frames"]["maximum"] == 8  # this server's --max-frames, stated
    upload = paths["/v1/videos/upload"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    form = schema["components"]["schemas"][upload["$ref"].split("/")[-1]]
    assert {"params", "video", "image", "last_image"} <= set(form["properties"])
    assert form["properties"]["video"]["contentMediaType"] == "application/octet-stream"  # a file (OpenAPI 3.1)
    assert "get_video" in json.dumps(create["responses"]["202"]["links"])


def _schemathesis(server: Server, examples: int, seed: int) -> subprocess.CompletedProcess:
    st = shutil.which("st")
    assert st, "schemathesis is a test dependency (pip install -e '.[test]')"
    # run in a fresh folder: schemathesis keeps a cache of past cases (and replays past crashes) in the working
    # directory's .schemathesis/, which made a run depend on earlier runs on the machine and wrote into the checkout
    with tempfile.TemporaryDirectory() as fresh:
        return subprocess.run([st, "--config-file", str(CONFIG), "run", server.url + "/openapi.json", "--checks", "all",
                               "-n", str(examples), "--seed", str(seed), "-H", f"Authorization: Bearer {TOKEN}",
                               # DELETE cancels: the record stays readable as `cancelled` (clients poll for the
                               # outcome), so "deleted resource still available" is not this API's rule (`--checks
                               # all` re-enables a check the config file turns off, hence on the command line)
                               "--exclude-checks", "use_after_free",
                               "--no-color"], capture_output=True, text=True, timeout=600, cwd=fresh)


def test_schemathesis_finds_nothing(server):
    """`st run --checks all` against the embedded server: any 5xx, undocumented status, response off its schema or
    bad content type is a failure."""
    result = _schemathesis(server, examples=8, seed=2)
    assert result.returncode == 0, result.stdout[-6000:]
    assert " passed" in result.stdout and "failure" not in result.stdout.split("SUMMARY")[-1].lower()


def test_schemathesis_finds_nothing_on_ray(tiny_checkpoint, tmp_path):
    """The same contract on the Ray actor pool (`serve --ray local`), and the client's round trip there gives the
    local CLI's bytes."""
    import sys

    from vidfusion.client import Client

    pytest.importorskip("ray")
    srv = Server(tiny_checkpoint, tmp_path / "data", "--ray", "local", "--workers", "1", "--max-frames", "8",
                 "--max-pixels", str(64 * 64), token=TOKEN).start(timeout=300)
    try:
        client = Client(srv.url, token=TOKEN)
        job = client.wait(client.create("a cat on ray", seed=9, num_frames=2, height=32, width=32,
                                        num_inference_steps=2), timeout=300)
        local = tmp_path / "local.mp4"
        assert subprocess.run([sys.executable, "-m", "vidfusion", "generate", "a cat on ray", "--model",
                               str(tiny_checkpoint), "--frames", "2", "--height", "32", "--width", "32", "--steps",
                               "2", "--seed", "9", "--out", str(local), "--quiet"], timeout=300).returncode == 0
        assert client.download(job, tmp_path / "ray.mp4").read_bytes() == local.read_bytes()
        result = _schemathesis(srv, examples=4, seed=3)
        assert result.returncode == 0, result.stdout[-6000:]
    finally:
        srv.stop()
