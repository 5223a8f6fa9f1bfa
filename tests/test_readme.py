"""The README's Python example runs as written (in a copy of the files it names)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]


def _python_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Using automerge from Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, "the section holds one runnable example"
    return blocks[0]


@pytest.mark.slow
def test_the_python_example_in_the_readme_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("payloads/tiny.yaml", "studies/demo.yaml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    import automerge.study.runner as runner

    monkeypatch.setattr(runner, "Console", lambda: Console(quiet=True))  # keep the test log short
    namespace: dict[str, object] = {}
    exec(compile(_python_example(), "README.md", "exec"), namespace)  # noqa: S102 - our own README
    summary = namespace["summary"]
    assert summary.ran == 3 and (summary.export_dir / "model.safetensors").is_file()
    assert (tmp_path / "merged.safetensors").is_file()


def test_the_readme_lists_where_blocks_differ_from_other_tools() -> None:
    """The README said blocks "follow supermerger's convention" without the exceptions a user porting a
    recipe needs (issue 14)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("Blocks follow supermerger's convention") :][:2000]
    for needed in ("positional_embedding", "text_projection", "logit_scale", "sd-mecha", "time_embed", "VAE"):
        assert needed in section, needed
