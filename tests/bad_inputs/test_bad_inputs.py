"""The corpus of bad inputs (issue 13): every case in ``cases.yaml`` runs the real CLI in a folder of
tiny models and valid files, and must end with its exit code (2; 130 for an interrupt), exactly its
expected first line on stderr and no other line, no traceback, and the folder as it was: nothing
created, changed or removed (sizes, modification times and contents of every file compared).

A case: ``id``; ``run`` (the command line, in the case's folder); ``files`` (text files to write
first; ``{tmp}`` is the folder); ``make`` (file → one of ``MAKERS``, for binary files); ``study``
(changes to ``BASE_STUDY``, written as study.yaml; ``run`` defaults to ``optimize study.yaml``);
``interrupt`` (``module:attribute`` replaced by a function that raises KeyboardInterrupt, as Ctrl-C
would there); ``line`` (the expected first line, ``{tmp}`` for the folder); ``code`` (default 2).
Set ``AUTOMERGE_CORPUS_SHOW=1`` to print what each case gives instead of checking it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shlex
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_helpers import run_cli

CASES_FILE = Path(__file__).with_name("cases.yaml")
CASES: list[dict[str, Any]] = yaml.safe_load(CASES_FILE.read_text())
SHOW = os.environ.get("AUTOMERGE_CORPUS_SHOW") == "1"

PAYLOAD = {
    "defaults": {"steps": 1, "cfg": 1.0, "width": 64, "height": 64, "scheduler": "euler", "seeds": [7]},
    "items": [{"prompt": "a red house"}],
}
BASE_STUDY: dict[str, Any] = {
    "name": "corpus",
    "models": {"a": "a.safetensors", "b": "b.safetensors"},
    "method": "weighted_sum",
    "search": {"alpha": {"groups": {"TEXT": ["BASE"], "UNET": ["IN00", "IN01", "OUT11"]}}},
    "payloads": ["payload.yaml"],
    "reward": {"reference": {"metric": "mse", "target": {"params": {"alpha": 0.3}}}},
    "sampler": {"name": "random", "seed": 0},
    "trials": 2,
    "early_stopping": None,
    "render": {"device": "cpu"},
}


# -- binary files the cases name --------------------------------------------------------------------


def _safetensors(header: dict[str, Any], data: bytes = b"", *, length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def _pickle_zip(payload: bytes) -> bytes:
    """A torch zip checkpoint (archive/data.pkl) holding ``payload`` as its pickle."""
    import io

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/version", "3\n")
    return buffer.getvalue()


HOSTILE_PICKLE = b"cos\nsystem\n(S'touch pwned'\ntR."  # protocol 0: os.system("touch pwned")
HOSTILE_PICKLE_2 = b"\x80\x02cposix\nsystem\nq\x00X\x0b\x00\x00\x00touch pwnedq\x01\x85q\x02Rq\x03."


def _tensor_file(source: Path, change: str) -> bytes:
    """A copy of tiny model ``source`` with one change: ``nan-vae`` or ``drop-unet-key``."""
    from safetensors.torch import load_file, save

    tensors = load_file(source)
    if change == "nan-vae":
        key = sorted(k for k in tensors if k.startswith("first_stage_model.decoder."))[0]
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = float("nan")
    elif change == "drop-unet-key":
        del tensors[sorted(k for k in tensors if k.startswith("model.diffusion_model.input_blocks.1."))[0]]
    return save(tensors)


MAKERS: dict[str, Any] = {
    "empty": lambda folder: b"",
    "four-bytes": lambda folder: b"\x01\x02\x03\x04",
    "header-longer-than-file": lambda folder: _safetensors({}, length=1000),
    "header-length-2^40": lambda folder: _safetensors({}, length=2**40),
    "header-not-json": lambda folder: struct.pack("<Q", 8) + b"\xff\xfe{not j",
    "header-a-list": lambda folder: _safetensors([1, 2]),  # type: ignore[arg-type]
    "offsets-past-the-end": lambda folder: _safetensors(
        {"model.diffusion_model.out.2.bias": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
        b"\0" * 8,
    ),
    "shape-size-mismatch": lambda folder: _safetensors(
        {"model.diffusion_model.out.2.bias": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}},
        b"\0" * 8,
    ),
    "unknown-dtype": lambda folder: _safetensors(
        {"model.diffusion_model.out.2.bias": {"dtype": "Q8", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4
    ),
    "overlapping-tensors": lambda folder: _safetensors(
        {
            "model.diffusion_model.out.2.bias": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "model.diffusion_model.out.2.weight": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        b"\0" * 12,
    ),
    "no-tensors": lambda folder: _safetensors({"__metadata__": {"format": "pt"}}),
    "not-a-model": lambda folder: _safetensors(
        {"some.layer.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8
    ),
    "hostile-pickle-zip": lambda folder: _pickle_zip(HOSTILE_PICKLE),
    "hostile-pickle-zip-protocol-2": lambda folder: _pickle_zip(HOSTILE_PICKLE_2),
    "hostile-pickle-legacy": lambda folder: HOSTILE_PICKLE,
    "hostile-pickle-protocol-2": lambda folder: HOSTILE_PICKLE_2,
    "zip-without-pickle": lambda folder: _zip_without_pickle(),
    "random-bytes": lambda folder: hashlib.sha256(b"x").digest() * 64,
    "text": lambda folder: b"this is not a model\n",
    "nan-vae": lambda folder: _tensor_file(folder / "a.safetensors", "nan-vae"),
    "drop-unet-key": lambda folder: _tensor_file(folder / "a.safetensors", "drop-unet-key"),
    "not-utf8": lambda folder: b"models:\n  a: \xff\xfe\n",
}


def _zip_without_pickle() -> bytes:
    import io

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/readme.txt", "hello")
    return buffer.getvalue()


# -- the folder -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> dict[str, Path]:
    """The models every case may name: a, b, c (tiny SD1) and x (tiny SDXL)."""
    from automerge.tiny import write_tiny

    folder = tmp_path_factory.mktemp("corpus-sources")
    return {
        "a.safetensors": tiny_models["a"],
        "b.safetensors": tiny_models["b"],
        "c.safetensors": tiny_models["c"],
        "x.safetensors": write_tiny("sdxl", folder / "x.safetensors", seed=1),
    }


def _snapshot(folder: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under ``folder``: kind, size, modification time and (for files) sha256."""
    state: dict[str, tuple[Any, ...]] = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_symlink():
            state[name] = ("link", os.readlink(path))
        elif path.is_dir():
            state[name] = ("dir",)
        else:
            info = path.stat()
            state[name] = (
                "file",
                info.st_size,
                info.st_mtime_ns,
                hashlib.sha256(path.read_bytes()).hexdigest(),
            )
    return state


def _prepare(case: dict[str, Any], folder: Path, sources: dict[str, Path]) -> list[str]:
    for name, source in sources.items():
        os.link(source, folder / name)
    (folder / "payload.yaml").write_text(yaml.safe_dump(PAYLOAD))
    for name, maker in (case.get("make") or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(MAKERS[maker](folder))
    for name, text in (case.get("files") or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text.replace("{tmp}", str(folder)))
    for name, target in (case.get("links") or {}).items():
        os.symlink(target, folder / name)
    if "study" in case:
        study = {**BASE_STUDY, **(case["study"] or {})}
        (folder / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    return shlex.split(case.get("run", "optimize study.yaml"))


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_a_bad_input_is_refused_with_one_line_and_nothing_on_disk_changes(
    case: dict[str, Any], sources: dict[str, Path], tmp_path: Path, capsys, monkeypatch
) -> None:
    folder = tmp_path / "case"
    folder.mkdir()
    args = _prepare(case, folder, sources)
    monkeypatch.chdir(folder)
    for precondition in case.get("before") or []:
        assert run_cli(capsys, *shlex.split(precondition)).code == 0
    if "interrupt" in case:
        module, _, attribute = case["interrupt"].partition(":")
        owner = importlib.import_module(module)
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)

        def interrupted(*args: object, **kwargs: object) -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(owner, name, interrupted)
    before = _snapshot(folder)
    result = run_cli(capsys, *args)
    after = _snapshot(folder)
    lines = result.err.splitlines()
    if SHOW:
        print(f"\nCASE {case['id']}\n  code {result.code}\n  line {lines[0] if lines else '(none)'}")
        print("  more " + "\n  more ".join(lines[1:4]) if len(lines) > 1 else "", end="")
        print(f"\n  disk {sorted(set(after) ^ set(before)) or 'same'}")
        return
    expected = case["line"].replace("{tmp}", str(folder))
    assert (result.code, lines) == (case.get("code", 2), [expected]), result.err
    assert "Traceback" not in result.out + result.err
    kept = set(case.get("keeps") or [])  # what a run keeps on purpose (an interrupted merge's partial)
    assert kept <= set(after) - set(before)
    assert {
        k: v for k, v in after.items() if k not in kept
    } == before  # nothing else created, changed or removed
    assert not (folder / "pwned").exists()


def test_a_dashboard_on_a_port_in_use_is_refused_before_it_prints_or_creates_anything(
    sources: dict[str, Path], tmp_path: Path, capsys, monkeypatch
) -> None:
    """Before: "Listening on …" and then a traceback from the server's bind."""
    import socket

    folder = tmp_path / "case"
    folder.mkdir()
    _prepare({"study": {}}, folder, sources)
    monkeypatch.chdir(folder)
    assert run_cli(capsys, "optimize", "study.yaml", "--no-export").code == 0
    before = _snapshot(folder)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(capsys, "dashboard", "study.yaml", "--port", str(port))
    assert (result.code, result.err.splitlines()) == (
        2,
        [f"error: --port {port}: already in use on 127.0.0.1; pass another --port"],
    )
    assert result.out == "" and _snapshot(folder) == before
