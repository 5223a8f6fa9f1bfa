"""The one YAML loader: errors name the file, the field path and a did-you-mean."""

from __future__ import annotations

from pathlib import Path

import pytest

from automerge.config import Schema, parse_file
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
        ("items: [", "invalid YAML"),
    ],
)
def test_errors_name_the_file_and_field(text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "doc.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        parse_file(Doc, path)
    assert str(path) in str(error.value) and message in str(error.value)


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    path = tmp_path / "doc.yaml"
    path.write_text("path: !!python/object/apply:os.system ['touch pwned']")
    with pytest.raises(ConfigError):
        parse_file(Doc, path)
    assert not (tmp_path / "pwned").exists()
