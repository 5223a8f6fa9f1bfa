"""The one YAML loader: errors name the file, the field path and a did-you-mean."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field

from automerge.config import FileRef, Schema, parse_file
from automerge.errors import ConfigError


class Item(Schema):
    step: int = 1


class Doc(Schema):
    items: list[Item] = []
    named: dict[str, Item] = {}
    path: str = "x"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("items: [{stpe: 2}]", "unknown key 'items.0.stpe' (did you mean 'step'?)"),
        ("named: {a: {stpe: 2}}", "unknown key 'named.a.stpe' (did you mean 'step'?)"),
        ("paht: y", "unknown key 'paht' (did you mean 'path'?)"),
        ("items: [{step: many}]", "field 'items.0.step'"),
        ("items: [3]", "field 'items.0': expected a mapping with keys step; found 3"),
        ("items: [", "invalid YAML"),
    ],
)
def test_errors_name_the_file_and_field(text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "doc.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        parse_file(Doc, path)
    assert str(path) in str(error.value) and message in str(error.value)


class Inline(Schema):
    folder: str | None = None
    metric: str = "ssim"


class Either(Schema):
    """A field that takes a file path or an inline mapping, like a study's ``reward``."""

    source: FileRef | Inline = Field(default_factory=Inline)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("source: {foldr: x}", "unknown key 'source.foldr' (did you mean 'folder'?)"),
        ("source: {metric: [1]}", "field 'source.metric': Input should be a valid string"),
        ("source: 5", "field 'source': expected a file path or a mapping with keys folder, metric; found 5"),
    ],
)
def test_errors_in_a_union_field_name_the_branch_the_input_took(
    text: str, message: str, tmp_path: Path
) -> None:
    path = tmp_path / "doc.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        parse_file(Either, path)
    text_of_error = str(error.value)
    assert message in text_of_error, text_of_error
    assert "function-after" not in text_of_error and "Inline" not in text_of_error.split(":")[1]


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    path = tmp_path / "doc.yaml"
    path.write_text("path: !!python/object/apply:os.system ['touch pwned']")
    with pytest.raises(ConfigError):
        parse_file(Doc, path)
    assert not (tmp_path / "pwned").exists()


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path) -> None:
    """A 1 kB file of nested aliases ran 5 minutes at 3.5 GB before being killed; now it is refused
    while parsing, before anything is expanded."""
    from automerge.config import load_yaml
    from automerge.errors import ConfigError

    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 13)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"bomb.yaml: more than 100 YAML aliases"):
        load_yaml(bomb)


def test_a_few_aliases_still_load(tmp_path) -> None:
    from automerge.config import load_yaml

    path = tmp_path / "ok.yaml"
    path.write_text("base: &b {steps: 4}\none: *b\ntwo: *b\n")
    assert load_yaml(path) == {"base": {"steps": 4}, "one": {"steps": 4}, "two": {"steps": 4}}


def test_a_wrong_value_is_quoted_without_writing_it_out_in_full() -> None:
    """The alias-bomb case: 72 aliases (under the limit) make 9**9 shared leaves; the error message
    quotes the value, and quoting must not visit every leaf (it took 80 s before reprlib)."""
    from automerge.config._loader import _short

    visited = []

    class Leaf:
        def __repr__(self) -> str:
            visited.append(1)
            return "x"

    value: object = [Leaf()] * 9
    for _ in range(3):
        value = [value] * 9  # 9**4 leaves
    text = _short(value)
    assert len(text) <= 80 and text.startswith("[[[")
    assert len(visited) < 100  # of 6561
