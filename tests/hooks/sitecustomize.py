"""Test hook, on the PYTHONPATH of processes a test starts (Ray workers, servers): when $VIDFUSION_TEST_GENERATIONS
is set, every TextToVideoPipeline call appends "start PID PROMPT" before it and "done PID PROMPT" (or "stopped PID
PROMPT" on an exception) after it, one O_APPEND line each. Tests count generations from it, independently of the
code under test. With $VIDFUSION_TEST_WORKER_DIES, a job whose prompt is "die" ends the worker thread that takes it
(a fatal bug, injected: the service must report it). It patches the modules when they are first imported, so it
costs nothing elsewhere."""

import importlib.abc
import importlib.util
import os
import sys

LOG = os.environ.get("VIDFUSION_TEST_GENERATIONS")
WORKER_DIES = os.environ.get("VIDFUSION_TEST_WORKER_DIES")


def _write(kind, prompt):
    with open(LOG, "a") as f:
        f.write(f"{kind} {os.getpid()} {prompt}\n")


def _patch(module):
    cls = module.TextToVideoPipeline
    original = cls.__call__

    def counted(self, prompt=None, *args, **kwargs):
        _write("start", prompt)
        try:
            output = original(self, prompt, *args, **kwargs)
        except BaseException:
            _write("stopped", prompt)
            raise
        _write("done", prompt)
        return output

    cls.__call__ = counted


def _patch_worker(module):
    original = module.Worker.run_job

    def run_job(self, job_id, params):
        if params.get("prompt") == "die":
            raise SystemExit("injected: the worker thread dies")
        return original(self, job_id, params)

    module.Worker.run_job = run_job


PATCHES = {**({"vidfusion.pipelines.text_to_video": _patch} if LOG else {}),
           **({"vidfusion.serve.worker": _patch_worker} if WORKER_DIES else {})}


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            PATCHES[name](module)

        spec.loader.exec_module = exec_and_patch
        return spec


if PATCHES:
    sys.meta_path.insert(0, _Finder())
