"""`vidfusion generate --server URL` and `vidfusion jobs ...`: the same command line, run by a vidfusion server
through the client (vidfusion.client): input files uploaded, the server's progress as the progress bar, the same
file written under the same name rule, the same exit codes (a request the server refuses is exit 2)."""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

from ..client import Client, ClientError, InvalidRequest, NotFound, TooLarge

# generate's option (dest) -> the request field the server takes
REQUEST_FIELDS = {"negative_prompt": "negative_prompt", "frames": "num_frames", "height": "height", "width": "width",
                  "steps": "num_inference_steps", "guidance": "guidance_scale", "sampler": "sampler", "seed": "seed",
                  "fps": "fps", "interpolate_fps": "interpolate_fps", "strength": "strength", "cache": "cache",
                  "cache_interval": "cache_interval", "cache_branch": "cache_branch"}
FILE_FLAGS = {"image": "image", "last_image": "last_image", "init_video": "video"}  # uploaded
# what only steers this command (where to write, how to show it), never the video
COMMAND_FLAGS = {"command", "prompt", "server", "token", "out", "quiet", "debug", "from_file"}


class RefusedByServer(ValueError):
    """A request the server refused (4xx): an input mistake, exit 2."""


def server_request(args: argparse.Namespace) -> dict[str, Any]:
    """The request a `generate` command line makes: its given options as request fields (the server's defaults
    for the rest, as a local run has its own), a seed drawn here when none is given (printed, so it can be remade).
    An option the server does not take is refused, never dropped."""
    local = sorted(args.given - COMMAND_FLAGS - set(REQUEST_FIELDS) - set(FILE_FLAGS))
    if local:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in local)
        raise ValueError(f"{flags}: not taken by a server (it runs its own model and settings); drop them, or run "
                         "here without --server")
    fields = {REQUEST_FIELDS[name]: getattr(args, name) for name in REQUEST_FIELDS if name in args.given}
    fields["seed"] = args.seed if args.seed is not None else random.randrange(2**63)
    return fields


def generate_remote(args: argparse.Namespace, out: Path) -> list[str]:
    """Run one `generate` on the server and write its video to `out`; returns [path]."""
    from tqdm.auto import tqdm

    if out.suffix.lower() != ".mp4":
        raise ValueError(f"--out {out}: a server writes .mp4 videos; name the file .mp4")
    fields = server_request(args)
    files = {flag: getattr(args, name) for name, flag in FILE_FLAGS.items() if getattr(args, name, None)}
    client = Client(args.server, token=args.token)
    job = _refused_is_2(client.create, args.prompt, **files, **fields)  # a refusal prints one line, no bar
    bar = tqdm(total=job["progress"]["total"], disable=args.quiet, desc=f"job {job['id'][:8]}", unit="step")

    def progress(state: dict[str, Any]) -> None:
        bar.total, bar.n = state["progress"]["total"], state["progress"]["step"]
        bar.refresh()

    try:
        final = client.wait(job, on_progress=progress)
    finally:
        bar.close()
    if final["status"] != "succeeded":
        raise RuntimeError(f"the server's job {final['id']} {final['status']}: {final.get('error') or ''}".strip())
    client.download(final, out)
    print(f"vidfusion: seed {fields['seed']}; job {final['id']} on {args.server}; remake with --seed or --from "
          f"{out}", file=sys.stderr)
    return [str(out)]


def jobs_command(args: argparse.Namespace) -> str:
    """`vidfusion jobs list|show|cancel|download [JOB] --server URL`."""
    if not args.server:
        raise ValueError("jobs needs a server: --server URL or $VIDFUSION_SERVER")
    client = Client(args.server, token=args.token)
    if args.action == "list":
        rows = _refused_is_2(client.list, args.status, args.limit)
        return "\n".join(f"{j['id']}  {j['status']:<9}  {j['progress']['step']}/{j['progress']['total']}  "
                         f"{json.dumps(j['params'].get('prompt'))}" for j in rows) or "(no jobs)"
    if args.job is None:
        raise ValueError(f"jobs {args.action} needs a job id")
    if args.action == "show":
        return json.dumps(_refused_is_2(client.get, args.job), indent=2)
    if args.action == "cancel":
        return _refused_is_2(client.cancel, args.job)["status"]
    return str(_refused_is_2(client.download, args.job, Path(args.out or f"vidfusion-{args.job}.mp4")))


def _refused_is_2(call: Any, *a: Any, **k: Any) -> Any:
    """A call whose refusal by the server (bad request, unknown job, too large, no token) is an input mistake."""
    try:
        return call(*a, **k)
    except (InvalidRequest, NotFound, TooLarge) as exc:
        raise RefusedByServer(f"the server refused it: {exc}") from None
    except ClientError as exc:
        if exc.status in (401, 409):
            raise RefusedByServer(f"the server refused it: {exc}") from None
        raise
