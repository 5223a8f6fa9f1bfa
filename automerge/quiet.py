"""Notices of the libraries automerge drives that mislead its users, dropped narrowly: called by the
subpackages that import those libraries (``render``, ``rewards``), never at ``import automerge``."""

from __future__ import annotations

import logging

_NOTICE = "requires torchvision (not installed)"
_LOGGER = "transformers.utils.import_utils"


class _DropTorchvisionFallbackNotice(logging.Filter):
    """transformers ≥ 5 warns, whenever diffusers imports ``CLIPImageProcessor`` and
    ``SiglipImageProcessor`` without torchvision, that it falls back to their PIL backends. automerge
    uses the PIL backends on purpose (``rewards.pretrained.image_processor_class``), so the notice,
    which told every user to install torchvision, is dropped; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _NOTICE not in record.getMessage()


def drop_torchvision_notice() -> None:
    """Install the filter on transformers' import logger (once per process)."""
    logger = logging.getLogger(_LOGGER)
    if not any(isinstance(f, _DropTorchvisionFallbackNotice) for f in logger.filters):
        logger.addFilter(_DropTorchvisionFallbackNotice())


def no_loading_bars() -> None:
    """transformers' "Loading weights" progress bars: a study draws its own status line while reward
    models load, and the bars broke it into fragments. Turned off for this process."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
