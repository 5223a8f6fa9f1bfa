"""The errors automerge reports to users.

Every ``AutomergeError`` is a problem with the user's input or environment: the CLI prints it as one
line and exits with code 2. Anything else that escapes is a bug and shows its traceback.
"""

from __future__ import annotations


class AutomergeError(Exception):
    """A user-facing error: the message names the file or value, what is wrong, and the fix."""


class ConfigError(AutomergeError):
    """A YAML file (recipe, study, payload, reward manifest) is missing or invalid."""


class CheckpointError(AutomergeError):
    """A checkpoint cannot be read: missing, corrupt, unsafe or of an unknown layout."""


class UnsupportedModelError(CheckpointError):
    """A checkpoint of a recognised family that automerge does not support yet."""


class MergeError(AutomergeError):
    """Sources that cannot be merged together, or a merge that produced non-finite values."""


class RenderError(AutomergeError):
    """Rendering failed for a reason the user can act on (bad payload, NaN images)."""


class RewardError(AutomergeError):
    """A reward model cannot be loaded or scored (missing weights, sha256 mismatch)."""


class StudyError(AutomergeError):
    """A study cannot be created, resumed or exported."""
