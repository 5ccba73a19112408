"""The one state-file reader: .safetensors files (read into memory we own, floats cast, conv weights channels-last)
and PyTorch pickles (.pt / .pth / .bin / .ckpt) read without executing pickled code.

The pickle reader needs none of the packages a checkpoint names: tensors are rebuilt from the archive's storages,
a few known containers are real, and every other class becomes an inert placeholder that records its arguments. So
the original `VQGAN_autoencoder.pth` (a PyTorch Lightning checkpoint holding a ModelCheckpoint callback and numpy
scalars) loads without pytorch_lightning installed, and a LoRA .pt with a malicious class runs nothing.
"""

from __future__ import annotations

import collections
import json
import math
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, CheckpointNotFoundError


def read_state_file(path: str | os.PathLike, dtype: torch.dtype | None = None,
                    error: type[Exception] = CheckpointError, what: str = "") -> tuple[Any, dict[str, str]]:
    """(content, metadata) of a weights file: a .safetensors file's tensors (floats cast to `dtype`) and its
    metadata, or the object a torch.save file holds (usually a dict of tensors) and {}. Problems raise `error`
    naming the file, `what` before it (a missing file: CheckpointNotFoundError for the default CheckpointError)."""
    path = Path(path)
    if not path.is_file():
        raise (CheckpointNotFoundError if error is CheckpointError else error)(f"missing file: {path}")
    try:
        if path.suffix == ".safetensors":
            return _read_safetensors(path, dtype)
        if zipfile.is_zipfile(path):
            return _read_pickle_archive(path), {}
        # a pickle from PyTorch < 1.6 (no archive): torch's own reader, which refuses anything but tensors
        return torch.load(path, map_location="cpu", weights_only=True), {}
    except Exception as exc:
        raise error(f"cannot read {what}{path}: the file is truncated or corrupt ({type(exc).__name__}: "
                    f"{str(exc)[:200]}); download it again (pickled code is never executed: only tensors, lists and "
                    "dicts load)") from None


def _read_pickle_archive(path: Path) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if not names:
            raise ValueError("not a PyTorch checkpoint (no data.pkl in the archive)")
        prefix = names[0].rpartition("/")[0]
        with archive.open(names[0]) as f:
            return _RestrictedUnpickler(f, archive, prefix).load()


class Inert:
    """Stands in for a class named in a checkpoint that is not needed to read its tensors: built without running
    any of the real class's code; keeps what the pickle gave it."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {type(self).__module__}.{type(self).__name__}>"


_STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
                   "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}
_SAFE = {("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
         ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
         ("collections", "OrderedDict"): collections.OrderedDict, ("torch", "Size"): torch.Size}


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix
        self.inert: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE:
            return _SAFE[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) not in self.inert:  # never imported, never called: a fresh inert class
            self.inert[(module, name)] = type(name, (Inert,), {"__module__": f"inert.{module}"})
        return self.inert[(module, name)]

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, _numel = pid
        if isinstance(storage_type, _StorageType):
            dtype = storage_type.dtype
        elif isinstance(storage_type, torch.dtype):
            dtype = storage_type
        else:
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        data = bytearray(self.archive.read(f"{self.prefix}/data/{key}"))
        untyped = torch.frombuffer(data, dtype=torch.uint8).untyped_storage() if data else torch.UntypedStorage(0)
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def _read_safetensors(path: Path, dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a .safetensors file tensor by tensor straight into memory we own, cast to `dtype` and with conv
    weights in the channels-last layout the models use. Peak memory = the weights + one tensor (a memory map
    would keep the file's pages resident beside every converted copy)."""
    state: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header_len = int.from_bytes(f.read(8), "little")
        if not 2 <= header_len <= size - 8:
            raise ValueError(f"header length {header_len} does not fit a {size}-byte file")
        header = json.loads(f.read(header_len))
        metadata = header.pop("__metadata__", None) or {}
        base = 8 + header_len
        entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
        scratch = torch.empty(max([e - s for s, e in (i["data_offsets"] for _, i in entries)] + [0]), dtype=torch.uint8)
        for name, info in entries:
            start, end = info["data_offsets"]
            stored, shape = _SAFETENSORS_DTYPES[info["dtype"]], info["shape"]
            nbytes = math.prod(shape) * stored.itemsize
            if end - start != nbytes or base + end > size:
                raise ValueError(f"tensor {name}: {end - start} bytes at offset {start} for shape {shape} "
                                 f"in a {size}-byte file")
            target = dtype if dtype is not None and stored.is_floating_point else stored
            layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(len(shape), torch.contiguous_format)
            tensor = torch.empty(shape, dtype=target, memory_format=layout)  # conv weights: channels-last
            direct = target == stored and layout == torch.contiguous_format
            buffer = tensor.reshape(-1).view(torch.uint8) if direct else scratch[:nbytes]
            f.seek(base + start)
            if nbytes and f.readinto(memoryview(buffer.numpy())) != nbytes:
                raise ValueError(f"tensor {name} is cut short")
            if not direct:  # one reused scratch buffer: no per-tensor temporaries fragmenting the heap
                tensor.copy_(buffer.view(stored).view(shape))
            state[name] = tensor
    return state, dict(metadata)
