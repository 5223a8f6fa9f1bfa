"""YAML → validated, frozen pydantic objects. Raw dicts never leave this package."""

from automerge.config._loader import FileRef, Schema, load_yaml, parse_file, parse_model

__all__ = ["FileRef", "Schema", "load_yaml", "parse_file", "parse_model"]
