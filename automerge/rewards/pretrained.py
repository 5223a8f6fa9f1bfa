"""Loading transformers models and processors from local folders only, strictly: no hub access,
every checkpoint tensor accounted for, read failures as one ``RewardError`` line."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from automerge.errors import RewardError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ModelT = TypeVar("ModelT", bound="PreTrainedModel")


def load_pretrained(
    model_class: type[ModelT], folder: Path, *, device: torch.device, dtype: torch.dtype
) -> ModelT:
    """``model_class.from_pretrained(folder, local_files_only=True)`` in eval mode on ``device``/``dtype``.

    Missing or shape-mismatched tensors are errors; unexpected ones too, except the patterns the
    class itself lists in ``_keys_to_ignore_on_load_unexpected`` (e.g. a CLIP text tower that a
    vision-only reward does not use)."""
    try:
        model, info = model_class.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    except Exception as error:  # noqa: BLE001 - transformers/safetensors raise OSError, ValueError, SafetensorError…
        raise RewardError(
            f"{folder}: cannot load a {model_class.__name__} from this folder ({_reason(error)})"
        ) from None
    problems = {
        kind: sorted(info.get(kind) or ()) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    if any(problems.values()):
        found = "; ".join(
            f"{len(keys)} {kind.replace('_', ' ')} {keys[:3]}" for kind, keys in problems.items() if keys
        )
        raise RewardError(f"{folder}: the checkpoint does not fit {model_class.__name__}: {found}")
    return model.to(device=device, dtype=dtype).eval()


def load_local(loader: Any, folder: Path, *, what: str) -> Any:
    """``loader.from_pretrained(folder, local_files_only=True)`` for a tokenizer or image processor."""
    try:
        return loader.from_pretrained(folder, local_files_only=True)
    except Exception as error:  # noqa: BLE001 - missing files surface as OSError/ValueError/TypeError depending on the class
        raise RewardError(f"{folder}: cannot load the {what} from this folder ({_reason(error)})") from None


def image_processor_class(family: str) -> Any:
    """The PIL-backed image processor of ``family`` ("CLIP", "Siglip"): ``<family>ImageProcessorPil``
    in transformers ≥ 5 (no torchvision needed), the PIL-based ``<family>ImageProcessor`` before."""
    import transformers

    return getattr(transformers, f"{family}ImageProcessorPil", None) or getattr(
        transformers, f"{family}ImageProcessor"
    )


def features(output: Any) -> torch.Tensor:
    """Embeddings from ``get_image_features``/``get_text_features``: a tensor in transformers 4,
    an output object whose ``pooler_output`` holds the projected embeddings in transformers 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
