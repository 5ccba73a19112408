"""Test hook, on the PYTHONPATH of processes a test starts (Ray workers, servers): when $VIDFUSION_TEST_GENERATIONS
is set, every TextToVideoPipeline call appends "start PID PROMPT" before it and "done PID PROMPT" (or "stopped PID
PROMPT" on an exception) after it, one O_APPEND line each. Tests count generations from it, independently of the
code under test. It patches vidfusion.pipelines.text_to_video when that module is first imported, so it costs
nothing elsewhere."""

import importlib.abc
import importlib.util
import os
import sys

LOG = os.environ.get("VIDFUSION_TEST_GENERATIONS")


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


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "vidfusion.pipelines.text_to_video":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


if LOG:
    sys.meta_path.insert(0, _Finder())
