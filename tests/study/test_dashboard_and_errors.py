"""`automerge dashboard` serves the study with its images; bad study files fail with exit code 2."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from cli_helpers import run_cli
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
    finally:
        server.terminate()
        server.wait(timeout=10)


BAD_STUDIES = [
    ({"colour": 1}, "unknown key 'colour'"),
    ({"sampler": {"name": "tpe", "sed": 1}}, "unknown key 'sampler.sed' (did you mean 'seed'?)"),
    ({"search": {"alpha": {"blocks": ["IN12"]}}}, "no block 'IN12'"),
    ({"search": {"alpha": {"low": 0.8, "high": 0.2}}}, "low (0.8) must not be greater than high (0.2)"),
    ({"search": {"alfa": {}}}, "takes no parameter 'alfa'"),
    ({"search": {"alpha": {"low": 0.0, "high": 1.5}}}, "must be in [0, 1], got 1.5"),
    ({"payloads": ["missing.yaml"]}, "payload file"),
    ({"reward": "rewards/nope.yaml"}, "manifest"),
    ({"method": "weigted_sum"}, "did you mean 'weighted_sum'"),
    ({"timeout": "forever"}, "durations look like"),
    ({"timeout": 0}, "must be longer than 0 s"),
    ({"timeout": -5}, "must be longer than 0 s"),
    ({"trials": True}, "trials"),
    ({"trials": 10**400}, "trials"),
    ({"sampler": {"seed": 10**23}}, "sampler.seed"),
    (
        {"search": {"alpha": {"step": 1e-300}}},
        "search.alpha.step': Input should be greater than or equal to 0.000001",
    ),
    (
        {"search": {"alpha": {"groups": {"X": ["IN00"], "Y": ["IN00", "IN01"]}}}},
        "IN00 is in two groups, X and Y",
    ),
    ({"name": "../../../x"}, "name"),
    ({"storage": "mysql://u@h/db"}, "storage"),
    ({"render": {"device": "tpu9"}}, "render.device 'tpu9' is not a device"),
]


@pytest.mark.parametrize(("changes", "message"), BAD_STUDIES)
def test_bad_study_files_fail_before_any_model_loads(changes: dict, message: str, make_study, capsys) -> None:
    result = run_cli(capsys, "optimize", make_study(**changes))
    assert result.code == 2, result.err
    assert message in result.err.replace("\n", " ") and "Traceback" not in result.err


def test_optimize_command_runs_and_exports(make_study, tmp_path: Path, capsys) -> None:
    path = make_study(trials=3, export={"dir": str(tmp_path / "out")})
    result = run_cli(capsys, "optimize", path)
    assert result.code == 0, result.err
    assert (tmp_path / "out" / "recipe.yaml").exists()
