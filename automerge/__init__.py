"""automerge: Bayesian block-weight optimizer for Stable Diffusion checkpoint merges."""

import logging

__version__ = "0.1.0"


class _DropTorchvisionFallbackNotice(logging.Filter):
    """transformers ≥ 5 warns, whenever diffusers imports ``CLIPImageProcessor`` and
    ``SiglipImageProcessor`` without torchvision, that it falls back to their PIL backends. automerge
    uses the PIL backends on purpose (``rewards.pretrained.image_processor_class``), so the notice,
    which told every user to install torchvision, is dropped; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionFallbackNotice())
