"""LoRA support, by concept: file formats -> one internal form (lora_formats.py) and the adapter state of a
pipeline (adapters.py). This module keeps the public names importable from `vidfusion.lora`."""

from .adapters import LoraAdapters
from .errors import LoraError
from .lora_formats import AdaptableLayers, Adapter, LoraFile, LoraLayer, build_adapter, list_candidates, read_lora_file

__all__ = ["AdaptableLayers", "Adapter", "LoraAdapters", "LoraError", "LoraFile", "LoraLayer", "build_adapter",
           "list_candidates", "read_lora_file"]
