"""The package's imports flow one way (ARCHITECTURE.md): each part imports only parts in layers below
its own, so there is no import cycle between subpackages; the report is a leaf; ``automerge render``
never loads the study package."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "automerge"

# Bottom to top; a part may import parts of lower layers and of its own part, never of a higher layer
# or of another part in its layer.
LAYERS: list[set[str]] = [
    {"errors", "quiet", "terminal", "_version", "gc_scope"},
    {"registry"},
    {"dtypes", "files"},
    {"config"},
    {"arch"},
    {"checkpoints"},
    {"lora"},
    {"merge"},
    {"render", "rewards", "report", "interop"},
    {"tiny", "testing"},
    {"study"},
    {"commands"},
    {"cli"},
    {"__init__", "__main__"},
]
LAYER_OF = {part: index for index, parts in enumerate(LAYERS) for part in parts}


def _part(module: str) -> str:
    """``automerge.merge.engine`` → ``merge``; ``automerge`` → ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> set[str]:
    """Every automerge module ``path`` imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "automerge" or name.startswith("automerge.")}


def _edges() -> set[tuple[str, str, str]]:
    """(importing part, imported part, file) for imports across parts."""
    edges = set()
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        source = _part(".".join(relative.parts))
        for module in _imports(path):
            target = _part(module)
            if target != source:
                edges.add((source, target, str(path.relative_to(PACKAGE.parent))))
    return edges


def test_every_part_of_the_package_has_a_layer() -> None:
    parts = {
        _part(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)) for p in PACKAGE.rglob("*.py")
    }
    assert parts <= set(LAYER_OF), sorted(parts - set(LAYER_OF))


def test_imports_flow_down_the_layers_only() -> None:
    upward = sorted(
        f"{file}: {source} imports {target}"
        for source, target, file in _edges()
        if LAYER_OF[target] >= LAYER_OF[source]
    )
    assert upward == []


def test_the_report_is_a_leaf() -> None:
    assert sorted(f for source, _target, f in _edges() if source == "report") == []


@pytest.mark.slow
def test_automerge_render_loads_nothing_from_the_study_package(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    payload = tmp_path / "payload.yaml"
    payload.write_text(
        "defaults: {steps: 1, width: 64, height: 64, seeds: [1]}\nitems: [{prompt: a red house}]\n"
    )
    code = (
        "import sys\n"
        "from automerge.cli import main\n"
        f"sys.argv = ['automerge', 'render', {str(tiny_models['a'])!r}, {str(payload)!r}, "
        f"'-o', {str(tmp_path / 'out')!r}, '--device', 'cpu']\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "print(sorted(m for m in sys.modules if m.startswith('automerge.study') or m == 'optuna'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "out" / "i00-s0001.png").is_file()
    # the same fresh interpreter imported diffusers' pipelines (automerge/render/pipeline.py): transformers
    # warns once per process, so only a fresh one shows that automerge.quiet kept its notice out
    assert "requires torchvision" not in done.stderr
