"""The package version (one place: the package and checkpoint headers read it here)."""

__version__ = "0.1.0"
