"""The one loader for every YAML file automerge reads.

A bad file gives one line: the file, the field path, what was expected, what was found, and a
"did you mean" for a misspelled key. Paths inside a file are resolved relative to that file.
"""

from __future__ import annotations

import reprlib
import typing
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo
from pydantic.functional_validators import AfterValidator

from automerge.errors import ConfigError
from automerge.registry import did_you_mean

M = TypeVar("M", bound=BaseModel)

MAX_YAML_BYTES = 4 * 1024 * 1024  # study files, payloads, recipes and manifests are a few kB
MAX_YAML_ALIASES = 100  # "billion laughs": a 1 kB file of nested aliases expands to gigabytes


class _TooManyAliases(yaml.YAMLError):
    pass


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses more than ``MAX_YAML_ALIASES`` aliases (``*name``)."""

    def compose_node(self, parent: Any, index: Any) -> Any:  # PyYAML's signature
        if self.check_event(yaml.AliasEvent):
            self.aliases = getattr(self, "aliases", 0) + 1
            if self.aliases > MAX_YAML_ALIASES:
                raise _TooManyAliases(f"more than {MAX_YAML_ALIASES} aliases")
        return super().compose_node(parent, index)


class Schema(BaseModel):
    """Base of every config object: unknown keys are errors, objects are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _resolve_relative(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    value = value.expanduser()
    if base is not None and not value.is_absolute():
        value = Path(base) / value
    return value


FileRef = Annotated[Path, AfterValidator(_resolve_relative)]
"""A path in a config file, resolved relative to the file it was written in."""


def load_yaml(path: Path) -> Any:
    """Read a YAML file with PyYAML's safe loader (no tags that build objects), at most
    ``MAX_YAML_BYTES`` and ``MAX_YAML_ALIASES`` aliases; missing files and syntax errors are
    ``ConfigError``s."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: file not found")
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, expected a YAML file")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size} bytes, more than a config file's {MAX_YAML_BYTES}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot be read as UTF-8 text ({error})") from None
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader, with bounded aliases
    except _TooManyAliases:
        raise ConfigError(
            f"{path}: more than {MAX_YAML_ALIASES} YAML aliases (*name); write the values out"
        ) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}:{where}: invalid YAML: {problem}") from None


def parse_model(model: type[M], data: Any, *, source: Path | str, base_dir: Path | None = None) -> M:
    """Validate ``data`` into ``model``; errors name ``source`` and the field path."""
    if data is None:
        data = {}
    try:
        return model.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as error:
        raise ConfigError(_describe(error, model, source)) from None


def parse_file(model: type[M], path: Path | str) -> M:
    """Load a YAML file and validate it into ``model``, paths resolved relative to the file."""
    path = Path(path)
    # Absolute, so that a path from the file stays right wherever it is later used or written.
    return parse_model(model, load_yaml(path), source=path, base_dir=path.absolute().parent)


def _describe(error: ValidationError, model: type[BaseModel], source: Path | str) -> str:
    """One line for the most useful error: in a field that takes one of several forms (a path or a
    mapping), the form the input got furthest in; an unknown key before a missing one."""
    located = [(_clean_loc(model, tuple(e["loc"])), e) for e in error.errors(include_url=False)]
    top = located[0][0][:1]
    related = [(loc, e) for loc, e in located if loc[:1] == top]
    depth = max(len(loc) for loc, _ in related)
    deepest = [(loc, e) for loc, e in related if len(loc) == depth]
    loc, first = min(deepest, key=lambda item: item[1]["type"] != "extra_forbidden")
    field = ".".join(str(part) for part in loc) or "(top level)"
    found = first.get("input")
    if first["type"] == "extra_forbidden":
        known = _field_names_at(model, loc[:-1])
        hint = did_you_mean(str(loc[-1]), known) if known else ""
        allowed = f"; allowed keys: {', '.join(sorted(known))}" if known else ""
        return f"{source}: unknown key '{field}'{hint}{allowed}"
    if first["type"] == "missing":
        return f"{source}: field '{field}' is required"
    if len(deepest) > 1 and all(tuple(e["loc"]) != loc for _, e in deepest):  # every form failed here
        forms = " or ".join(dict.fromkeys(_expected(model, loc, e) for _, e in deepest))
        return f"{source}: field '{field}': expected {forms}; found {_short(found)}"
    if first["type"] == "model_type":
        return f"{source}: field '{field}': expected {_expected(model, loc, first)}; found {_short(found)}"
    message = first["msg"]
    message = message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if not loc:  # a check of the whole file names its own fields
        return f"{source}: {message}"
    return f"{source}: field '{field}': {message}; found {_short(found)}"


_EXPECTED_BY_ERROR = {
    "path_type": "a file path",
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
}


def _expected(model: type[BaseModel], loc: tuple[Any, ...], error: Any) -> str:
    """What one form of a field takes, e.g. "a file path", "a mapping with keys folder, metric"."""
    if error["type"] == "model_type":
        members = [*_forms_at(model, loc), *filter(None, [_field_model_at(model, loc)])]
        name = (error.get("ctx") or {}).get("class_name")
        keys = next((list(m.model_fields) for m in members if m.__name__ == name), [])
        return f"a mapping with keys {', '.join(keys)}" if keys else "a mapping"
    return _EXPECTED_BY_ERROR.get(error["type"], error["msg"])


_PRIMITIVE_BRANCHES = {"float", "int", "str", "bool"}  # pydantic's tags for `float | dict[...]` branches


def _clean_loc(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """``loc`` without pydantic's tags for the branches of a union (a model's class name, or a
    schema such as ``function-after[...]``), which mean nothing to the author of the file."""
    cleaned: list[Any] = []
    for part in loc:
        is_schema = isinstance(part, str) and ("[" in part or "(" in part or part in _PRIMITIVE_BRANCHES)
        is_branch = isinstance(part, str) and any(
            m.__name__ == part for m in _forms_at(model, tuple(cleaned))
        )
        if not (is_schema or is_branch):
            cleaned.append(part)
    return tuple(cleaned)


def _forms_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[type[BaseModel]]:
    """The model classes that the field at ``loc`` accepts (e.g. ``FileRef | Inline`` → [Inline])."""
    if not loc:
        return []
    parent = _field_model_at(model, loc[:-1])
    if parent is None:
        return []
    field = parent.model_fields.get(str(loc[-1]))
    return _models_in(field.annotation) if field is not None else []


def _field_model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    current: Any = model
    for part in loc:
        current = _nested_model(current, part)
        if current is None:
            return None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) or () for m in _models_in(arg)]


_QUOTE = reprlib.Repr()  # for large values; keyword arguments only from Python 3.12
_QUOTE.maxlevel, _QUOTE.maxlist, _QUOTE.maxtuple, _QUOTE.maxdict = 3, 4, 4, 4
_QUOTE.maxstring = _QUOTE.maxother = 40
_QUOTE_IN_FULL = 200  # values of at most this many items are quoted with repr, as written


def _short(value: Any) -> str:
    """``value`` quoted in at most 80 characters, without writing a huge (or alias-bombed) value out."""
    text = repr(value) if _items_within(value, _QUOTE_IN_FULL) else _QUOTE.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _items_within(value: Any, limit: int) -> bool:
    """Whether ``value`` (lists, tuples, dicts nested) holds at most ``limit`` items; stops counting there."""
    pending, count = [value], 0
    while pending:
        item = pending.pop()
        count += 1
        if count > limit:
            return False
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, (list, tuple, set)):
            pending.extend(item)
    return True


def _field_names_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the (nested) model at ``loc``, or [] when it cannot be told."""
    current: Any = model
    for part in loc:
        current = _nested_model(current, part)
        if current is None:
            return []
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _nested_model(current: Any, part: Any) -> Any:
    """One step down ``loc``: a field of a model, or (list index / dict key) the same item model."""
    if isinstance(current, type) and issubclass(current, BaseModel):
        field = current.model_fields.get(str(part)) if isinstance(part, str) else None
        if field is not None:
            return _unwrap(field.annotation)
        return current  # an index into list[M] or a key of dict[str, M]: still M
    return None


def _unwrap(annotation: Any) -> Any:
    """The model class inside ``list[M]``, ``dict[str, M]``, ``M | None``, else the annotation."""
    for arg in typing.get_args(annotation) or ():
        inner = _unwrap(arg)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner
    return annotation
