"""`automerge dashboard` serves the study with its images; bad study files fail with exit code 2."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cli_helpers import run_cli
from PIL import Image
from rich.console import Console

from automerge.study import load_study_file, run_study


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback only
        return json.loads(response.read())


def test_dashboard_serves_the_study_and_its_images_on_loopback(make_study) -> None:
    path = make_study(trials=3)
    run_study(load_study_file(path), console=Console(quiet=True), export=False)
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from automerge.cli import main; main()",
            "dashboard",
            str(path),
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline, studies = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            try:
                studies = _get(f"http://127.0.0.1:{port}/api/studies")
                break
            except OSError:
                time.sleep(0.3)
        assert studies is not None, "dashboard did not start"
        study = next(s for s in studies["study_summaries"] if s["study_name"] == "test-study")
        detail = _get(f"http://127.0.0.1:{port}/api/studies/{study['study_id']}?after=0")
        artifacts = [a for trial in detail["trials"] for a in trial["artifacts"]]
        assert len(artifacts) == 3 * 2
        assert all(a["mimetype"] == "image/png" for a in artifacts)
        trial = next(t for t in detail["trials"] if t["artifacts"])
        image_url = (
            f"http://127.0.0.1:{port}/artifacts/{study['study_id']}/{trial['trial_id']}/"
            f"{trial['artifacts'][0]['artifact_id']}"
        )
        with urllib.request.urlopen(image_url, timeout=5) as response:  # noqa: S310 - loopback only
            png = response.read()
        assert png.startswith(b"\x89PNG") and Image.open(io.BytesIO(png)).size == (64, 64)
    finally:
        server.terminate()
        output = server.communicate(timeout=10)[0].decode()
    # Quiet by default (it printed every HTTP request), and it says that its buttons write to the study.
    assert "GET /api" not in output and "HTTP/1.1" not in output, output
    assert "upload and delete buttons" in output


# Bad study files, each with its exact message: tests/bad_inputs/cases.yaml (the corpus).


def test_optimize_command_runs_and_exports(make_study, tmp_path: Path, capsys) -> None:
    path = make_study(trials=3, export={"dir": str(tmp_path / "out")})
    result = run_cli(capsys, "optimize", path)
    assert result.code == 0, result.err
    assert (tmp_path / "out" / "recipe.yaml").exists()
