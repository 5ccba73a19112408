"""The original ModelScope release files: a restricted reader for PyTorch checkpoints that may name arbitrary
classes (PyTorch Lightning's), and UNet state dicts converted both ways with convert.py's rules.

The reader never executes pickled code and needs none of the packages a checkpoint names: tensors are rebuilt from
the archive's storages, a few known containers are real, and every other class becomes an inert placeholder that
records its arguments. So `VQGAN_autoencoder.pth` (a Lightning checkpoint holding a ModelCheckpoint callback and
numpy scalars) loads without pytorch_lightning installed.
"""

from __future__ import annotations

import collections
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from .config import UNetConfig
from .convert import unet_name_to_diffusers, unet_name_to_original

# the temporal transformers' proj_in / proj_out are Conv1d (C, C, 1) in the original UNet, Linear in diffusers'
TEMPORAL_PROJ = re.compile(r"(^|\.)(transformer_in|temp_attentions\.\d+)\.(proj_in|proj_out)\.weight$")


class ConversionError(ValueError):
    """A file or state dict that does not fit the format: names the file and the first offending keys."""


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


def read_checkpoint(path: str | Path) -> Any:
    """Load a torch.save file without executing pickled code (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"missing file: {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not names:
                raise ConversionError(f"{path}: not a PyTorch checkpoint (no data.pkl in the archive)")
            prefix = names[0].rpartition("/")[0]
            with archive.open(names[0]) as f:
                return _RestrictedUnpickler(f, archive, prefix).load()
    except zipfile.BadZipFile:
        raise ConversionError(f"cannot read {path}: not a zip-format PyTorch checkpoint (truncated, or saved by "
                              "PyTorch < 1.6: re-save it with a current torch.save)") from None
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, RuntimeError) as exc:
        if isinstance(exc, ConversionError):
            raise
        raise ConversionError(f"cannot read {path}: the file is truncated or corrupt ({type(exc).__name__}: "
                              f"{str(exc)[:200]})") from None


def state_dict_of(obj: Any, where: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint object: a plain state dict or a Lightning-style {"state_dict": ...}; keys under
    `prefix` (e.g. "first_stage_model.") with it removed, when any key has it."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(f"{where}: not a state dict (expected a dict of tensors, or one under 'state_dict')")
    if prefix and any(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix):]: v for k, v in obj.items() if k.startswith(prefix)}
    return dict(obj)


def unet_to_diffusers(state: dict[str, torch.Tensor], cfg: UNetConfig, where: str = "UNet"
                      ) -> dict[str, torch.Tensor]:
    """An original-format UNet state dict -> diffusers key names and shapes (Conv1d projections -> Linear)."""
    out, unmatched = {}, []
    for key, value in state.items():
        name = unet_name_to_diffusers(key, cfg)
        if name is None:
            unmatched.append(key)
            continue
        out[name] = value.squeeze(-1) if TEMPORAL_PROJ.search(name) and value.dim() == 3 else value
    if unmatched:
        raise ConversionError(f"{where}: keys that are not part of the original UNet for this config: "
                              f"{', '.join(unmatched[:8])}" + (f" ... ({len(unmatched)} in all)"
                                                                if len(unmatched) > 8 else ""))
    return out


def unet_to_original(state: dict[str, torch.Tensor], cfg: UNetConfig, where: str = "UNet"
                     ) -> dict[str, torch.Tensor]:
    """A diffusers UNet state dict -> the original key names and shapes (Linear projections -> Conv1d (C, C, 1))."""
    out, unmatched = {}, []
    for key, value in state.items():
        name = unet_name_to_original(key, cfg)
        if name is None:
            unmatched.append(key)
            continue
        out[name] = value.unsqueeze(-1) if TEMPORAL_PROJ.search(key) and value.dim() == 2 else value
    if unmatched:
        raise ConversionError(f"{where}: keys with no original name: {', '.join(unmatched[:8])}")
    return out
