"""LoRA files in and out: ``read_lora`` maps a kohya/A1111, diffusers or PEFT LoRA (LoRA and LoCon layers)
onto a family's original-layout keys; ``apply_loras`` adds LoRAs to a tensor (the one function the export
and the live engine share); ``extract_lora`` makes a difference LoRA (B − A by truncated SVD per layer)
and ``write_kohya_lora`` writes it as kohya names it. Names are derived from each family's reference key
table through ``Architecture.targets`` (``_names.py``)."""

from automerge.lora._extract import Extraction, extract_lora, truncated_svd
from automerge.lora._layer import Lora, LoraLayer, apply_loras
from automerge.lora._names import NameIndex, Site, kohya_name, name_index
from automerge.lora._read import read_lora
from automerge.lora._shapes import real_shapes
from automerge.lora._write import write_kohya_lora

__all__ = [
    "Extraction",
    "Lora",
    "LoraLayer",
    "NameIndex",
    "Site",
    "apply_loras",
    "extract_lora",
    "kohya_name",
    "name_index",
    "read_lora",
    "real_shapes",
    "truncated_svd",
    "write_kohya_lora",
]
