"""Recipe files (``automerge merge RECIPE.yaml``; the ``recipe.yaml`` a study exports).

A recipe names its sources by lowercase names: ``a`` (primary: its key names, layout and unmerged
tensors are kept), ``b``, then ``c`` — the base for methods that need one (``base:`` is its alias) —
and ``d``, ``e``, ..., ``z``, ``aa``, ``ab``, ... for methods over many models; names sort by length,
then alphabet. ``models.many`` lists many files at once (a glob, a ``.txt`` list file or a YAML list,
see ``expand_models``). ``params`` gives each method parameter, and each model's weight
(``weight.NAME``) for methods that take weights, as one number or a per-block map
(``merge/params.py``). ``plan_merge`` (``merge/plan.py``) turns a recipe into a checked ``MergePlan``.

A model may be a checkpoint with LoRAs applied: ``a: {checkpoint: base.safetensors, loras: [{path:
style.safetensors, strength: 0.8}]}``; each LoRA is named (default: its file's stem) so that a study can
search its strength as ``lora.NAME``. Files are read as entries of ``models`` and kept as two fields:
``models`` (letter → checkpoint path) and ``loras`` (letter → its LoRAs, applied in order).
"""

from __future__ import annotations

import glob
import itertools
import numbers
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator, model_validator

from automerge.config import FileRef, Schema, parse_file, parse_model
from automerge.dtypes import ComputeDtypeName, DtypeName

MODEL_NAME = re.compile(r"[a-z]+")
BASE_NAME = "c"  # the base of methods that need one
BASE_ALIAS = "base"  # models.base: the same as models.c
MANY = "many"  # models.many: a glob, a .txt list file or a list of files, named by free_model_names
WEIGHT_PREFIX = "weight."  # params.weight.NAME: model NAME's weight, for methods that take weights
LIST_FILE_SUFFIX = ".txt"
_GLOB_MAGIC = re.compile(r"[*?[]")
LORA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
LORA_STRENGTH_LIMIT = 10.0  # |strength| of a LoRA, fixed or searched


class LoraEntry(Schema):
    """One LoRA applied to a model: ``strength`` × its delta (the ``alpha``/rank scale as its format
    states it); ``name`` (default: the file's stem) is how a study searches it (``lora.NAME``)."""

    path: FileRef
    strength: float = Field(
        1.0, ge=-LORA_STRENGTH_LIMIT, le=LORA_STRENGTH_LIMIT, description="multiplier of the LoRA's delta"
    )
    name: str = ""

    @model_validator(mode="after")
    def _named(self) -> LoraEntry:
        if not self.name:
            object.__setattr__(self, "name", re.sub(r"[^A-Za-z0-9_-]", "_", self.path.stem) or "lora")
        if not LORA_NAME.fullmatch(self.name):
            raise ValueError(
                f"LoRA name '{self.name}' must be letters, digits, _ and - (it is searched as lora.NAME)"
            )
        return self


def model_order(name: str) -> tuple[int, str]:
    """Sort key of model names: a, b, ..., z, aa, ab, ... (length, then alphabet)."""
    return len(name), name


def free_model_names(taken: set[str] | frozenset[str]) -> Iterator[str]:
    """The model names a list of files takes, in order: a, b, d, e, ..., z, aa, ab, ... without the
    names in ``taken`` (and never c, the base letter)."""
    for length in itertools.count(1):
        for letters in itertools.product("abcdefghijklmnopqrstuvwxyz", repeat=length):
            name = "".join(letters)
            if name != BASE_NAME and name not in taken:
                yield name


def expand_models(data: Any, *, base_dir: Path | None) -> Any:
    """``models.base`` → ``models.c``; ``models.many`` → one model per listed file, named by
    ``free_model_names`` after the explicit names, and each ``{path, weight}`` item's weight →
    ``params.weight.NAME``. ``many`` is a glob (relative to the file, sorted by path), a ``.txt`` list
    file (one path per line, relative to the list file; ``#`` comments and blank lines ignored) or a
    YAML list of paths or ``{path: P, weight: W}``. ``ValueError`` names the field and the pattern."""
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        return data
    models = dict(data["models"])
    if BASE_ALIAS in models:
        if BASE_NAME in models:
            raise ValueError(f"models.{BASE_ALIAS} is another name of models.{BASE_NAME}; give one of them")
        models[BASE_NAME] = models.pop(BASE_ALIAS)
    if MANY not in models:
        return {**data, "models": models}
    listed = _listed_files(models.pop(MANY), base_dir=base_dir or Path.cwd())
    weights: dict[str, tuple[Any, Path]] = {}
    for name, (path, weight) in zip(free_model_names(set(models)), listed, strict=False):
        models[name] = str(path)
        if weight is not None:
            weights[f"{WEIGHT_PREFIX}{name}"] = (weight, path)
    if not weights:
        return {**data, "models": models}
    params = data.get("params") or {}
    if not isinstance(params, dict):
        raise ValueError(f"params must be a mapping of parameter → value, found {params!r}")
    for param, (_, path) in weights.items():
        if param in params:
            raise ValueError(
                f"models.many: the weight of {path.name} ({param}) is given twice, there and in "
                f"params.{param}; keep one"
            )
    return {**data, "models": models, "params": {**params, **{k: w for k, (w, _) in weights.items()}}}


def _listed_files(many: Any, *, base_dir: Path) -> list[tuple[Path, Any]]:
    """(path, weight or None) of each file ``models.many`` lists, in order."""
    if isinstance(many, str) and many.endswith(LIST_FILE_SUFFIX) and not _GLOB_MAGIC.search(many):
        return [(path, None) for path in _list_file(base_dir / Path(many).expanduser())]
    if isinstance(many, str):
        return [(path, None) for path in _glob(many, base_dir=base_dir)]
    if isinstance(many, list) and many:
        return [_list_item(item, index, base_dir=base_dir) for index, item in enumerate(many)]
    raise ValueError(
        f"models.many must be a glob ('tunes/*.safetensors'), a {LIST_FILE_SUFFIX} list file or a "
        f"non-empty list of paths or {{path: P, weight: W}}; found {many!r}"
    )


def _glob(pattern: str, *, base_dir: Path) -> list[Path]:
    full = os.path.join(glob.escape(str(base_dir)), os.path.expanduser(pattern))  # absolute: as it is
    found = sorted(Path(match) for match in glob.glob(full, recursive=True))
    if not found:
        raise ValueError(f"models.many: the glob '{pattern}' matches no file (relative to {base_dir})")
    return found


def _list_file(path: Path) -> list[Path]:
    if not path.is_file():
        raise ValueError(f"models.many: the list file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"models.many: the list file {path} cannot be read as text ({error})") from None
    entries = [(number, line.split("#", 1)[0].strip()) for number, line in enumerate(lines, start=1)]
    paths = []
    for number, entry in entries:
        if entry:
            listed = path.parent / Path(entry).expanduser()
            if not listed.exists():
                raise ValueError(f"models.many: {path.name} line {number}: {listed} does not exist")
            paths.append(listed)
    if not paths:
        raise ValueError(f"models.many: the list file {path} lists no file")
    return paths


def _list_item(item: Any, index: int, *, base_dir: Path) -> tuple[Path, Any]:
    where = f"models.many[{index}]"
    weight = None
    if isinstance(item, dict):
        unknown = sorted(set(item) - {"path", "weight"})
        if unknown or "path" not in item:
            problem = f"unknown key {unknown[0]}" if unknown else "path is missing"
            raise ValueError(f"{where}: an item is a path or {{path: P, weight: W}}; {problem}")
        item, weight = item["path"], item.get("weight")
        if not isinstance(weight, numbers.Real) or isinstance(weight, bool) or not 0 <= weight < float("inf"):
            raise ValueError(f"{where}.weight must be a number in [0, inf), got {weight!r}")
    if not isinstance(item, str):
        raise ValueError(f"{where}: an item is a path or {{path: P, weight: W}}; found {item!r}")
    path = base_dir / Path(item).expanduser()
    if not path.exists():
        raise ValueError(f"{where}: {path} does not exist")
    return path, weight


def lift_model_entries(data: Any, *, base_dir: Path | None = None) -> Any:
    """``models`` as read (``expand_models`` first), then ``models: {a: {checkpoint: P, loras:
    [...]}}`` → ``models: {a: P}`` and ``loras: {a: [...]}`` (a plain path stays as it is); the two
    forms may be mixed across models."""
    data = expand_models(data, base_dir=base_dir)
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        return data
    models, loras = {}, dict(data.get("loras") or {})
    for letter, entry in data["models"].items():
        if isinstance(entry, dict) and ("checkpoint" in entry or "loras" in entry):
            unknown = sorted(set(entry) - {"checkpoint", "loras"})
            if unknown or "checkpoint" not in entry:
                raise ValueError(
                    f"models.{letter}: a model with LoRAs is {{checkpoint: PATH, loras: [{{path: PATH, "
                    f"strength: 1.0}}]}}; "
                    + (f"unknown key {unknown[0]}" if unknown else "checkpoint is missing")
                )
            models[letter] = entry["checkpoint"]
            if entry.get("loras"):
                if letter in loras:
                    raise ValueError(
                        f"models.{letter}: its LoRAs are given twice (here and in loras.{letter})"
                    )
                loras[letter] = entry["loras"]
        else:
            models[letter] = entry
    return {**data, "models": models, **({"loras": loras} if loras else {})}


def context_dir(info: ValidationInfo) -> Path | None:
    """The folder relative paths of the file being validated resolve against (None: the working one)."""
    base = (info.context or {}).get("base_dir")
    return None if base is None else Path(base)


def check_lora_names(
    loras: dict[str, list[LoraEntry]], models: dict[str, Path]
) -> dict[str, list[LoraEntry]]:
    """Every letter names a model and every LoRA name is unique across the models."""
    seen: dict[str, str] = {}
    for letter, entries in loras.items():
        if letter not in models:
            raise ValueError(f"loras.{letter}: there is no model '{letter}'")
        for entry in entries:
            if entry.name in seen:
                raise ValueError(
                    f"two LoRAs are named '{entry.name}' (models {seen[entry.name]} and {letter}); "
                    "give one of them another name: {path: ..., name: other}"
                )
            seen[entry.name] = letter
    return loras


def model_entries_yaml(
    models: dict[str, Path], loras: dict[str, list[LoraEntry]], *, model_path: Callable[[Path], str]
) -> dict[str, Any]:
    """``models`` as a file writes them: a path, or ``{checkpoint, loras}`` for a model with LoRAs."""
    written: dict[str, Any] = {}
    for letter, path in models.items():
        if loras.get(letter):
            written[letter] = {
                "checkpoint": model_path(path),
                "loras": [
                    {"path": model_path(e.path), "strength": e.strength, "name": e.name}
                    for e in loras[letter]
                ],
            }
        else:
            written[letter] = model_path(path)
    return written


def check_model_names(models: dict[str, Path]) -> dict[str, Path]:
    """Models named a, b, c, ..., z, aa, ab, ... (a and b required), sorted by ``model_order``;
    ``ValueError`` otherwise."""
    for name in models:
        if not MODEL_NAME.fullmatch(name):
            raise ValueError(
                f"model names are lowercase letters a, b, c (base), ..., z, aa, ab, ...; got '{name}' "
                f"(or {BASE_ALIAS}: PATH, {MANY}: GLOB)"
            )
    for required in ("a", "b"):
        if required not in models:
            raise ValueError(f"model '{required}' is required (a = primary, b = secondary, c = base)")
    return dict(sorted(models.items(), key=lambda item: model_order(item[0])))


class Recipe(Schema):
    """A recipe file: which models, which method, which (per-block) parameters."""

    models: dict[str, FileRef] = Field(description="a, b, c (base), d, ..., z, aa, ...: checkpoint paths")
    loras: dict[str, list[LoraEntry]] = Field(
        default_factory=dict, description="per model name, LoRAs applied to it (from models.X.loras)"
    )
    method: str
    params: dict[str, float | dict[str, float]] = Field(default_factory=dict)
    seed: int = Field(0, ge=0, description="seeds random methods per tensor key")
    dtype: DtypeName = "fp16"
    compute_dtype: ComputeDtypeName = "fp32"

    @model_validator(mode="before")
    @classmethod
    def _entries(cls, data: Any, info: ValidationInfo) -> Any:
        return lift_model_entries(data, base_dir=context_dir(info))

    @field_validator("models")
    @classmethod
    def _model_names(cls, models: dict[str, Path]) -> dict[str, Path]:
        return check_model_names(models)

    @model_validator(mode="after")
    def _lora_names(self) -> Recipe:
        check_lora_names(self.loras, self.models)
        return self

    def to_yaml_dict(self, *, model_path: Callable[[Path], str] = str) -> dict[str, Any]:
        """The recipe as plain data, each model path written by ``model_path`` (e.g. relative to the
        folder of the recipe file, or the bare file name for a checkpoint header)."""
        data = self.model_dump(mode="json", exclude={"loras"})
        data["models"] = model_entries_yaml(self.models, self.loras, model_path=model_path)
        return data


def load_recipe(path: Path | str) -> Recipe:
    """Read and validate a recipe file (model paths relative to it)."""
    return parse_file(Recipe, Path(path))


def recipe_from_data(data: Any, *, source: str, base_dir: Path | None = None) -> Recipe:
    """Validate recipe data that did not come from a file (errors name ``source``)."""
    return parse_model(Recipe, data, source=source, base_dir=base_dir)
