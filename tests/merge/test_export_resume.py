"""Resumable streamed export: a killed or interrupted export continues from its journal into the same
bytes as an uninterrupted one, merges only the missing keys, redoes a torn tensor, never resumes onto
another recipe, and leaves nothing at the output path until the end."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from io import StringIO
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli
from rich.console import Console
from safetensors.torch import load_file, save_file

import automerge.merge.export as export_module
from automerge.checkpoints import partial_paths
from automerge.commands import MergeProgress
from automerge.errors import ConfigError, MergeError
from automerge.merge import MergePlan, export_merge, plan_merge, recipe_from_data
from automerge.merge.export import ExportProgress, output_infos

STOP_AFTER = 400
"""Keys an interrupted export writes (of tiny SD1's 1134) before it is stopped."""


class Killed(BaseException):
    """Stands in for the process dying mid-export: not an ``Exception``, so nothing on the way catches it."""


@pytest.fixture(autouse=True)
def _one_write_at_a_time(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each key written before the next merges, so an export stopped from its progress callback has
    written exactly the keys reported (the tests below damage the last one); the SIGKILL test and the
    CLI's interrupt keep the writes in flight."""
    if "in_flight" not in request.keywords:
        monkeypatch.setattr(export_module, "WRITES_IN_FLIGHT", 0)
        monkeypatch.setattr(export_module, "SMALL_WRITES_IN_FLIGHT", 0)


def _recipe_data(models: dict[str, Path], alpha: float) -> dict:
    """add_difference of fine-tunes a and b over base c: three sources read per merged key."""
    return {
        "models": {n: str(models[n]) for n in "abc"},
        "method": "add_difference",
        "params": {"alpha": alpha},
    }


def _plan(models: dict[str, Path], alpha: float = 0.5) -> MergePlan:
    return plan_merge(recipe_from_data(_recipe_data(models, alpha), source="test.yaml"), source="test.yaml")


def _stop_after(keys: int, seen: list[tuple[int, int, int, int]] | None = None) -> ExportProgress:
    def progress(done_keys: int, total_keys: int, done_bytes: int, total_bytes: int) -> None:
        if seen is not None:
            seen.append((done_keys, total_keys, done_bytes, total_bytes))
        if done_keys >= keys:
            raise Killed

    return progress


def _interrupted(plan: MergePlan, out: Path, *, keys: int = STOP_AFTER) -> None:
    with pytest.raises(Killed):
        export_merge(plan, out, progress=_stop_after(keys))


def _merged_keys(plan: MergePlan) -> set[str]:
    """The keys a full export computes with ``merge_key`` (the rest are copied from A)."""
    checkpoint = plan.primary.checkpoint
    infos = output_infos(plan, dtype=plan.dtype)
    return {key for key in infos if plan.merged_block(key, checkpoint.info(key).dtype) is not None}


def _export_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if "safetensors" in path.name)


@pytest.fixture(scope="module")
def reference(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[float], bytes]:
    """The bytes of an uninterrupted export of the recipe with ``alpha`` (computed once each)."""
    folder = tmp_path_factory.mktemp("reference")
    exported: dict[float, bytes] = {}

    def bytes_for(alpha: float) -> bytes:
        if alpha not in exported:
            with _plan(tiny_models, alpha) as plan:
                exported[alpha] = export_merge(plan, folder / f"{alpha}.safetensors").read_bytes()
        return exported[alpha]

    return bytes_for


@pytest.fixture
def merge_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The keys merged (by ``merge_key``, or a run of small keys by ``merge_run``), in order."""
    calls: list[str] = []
    real, real_run = export_module.merge_key, export_module.merge_run

    def counting(plan: MergePlan, key: str, **options: object) -> torch.Tensor:
        calls.append(key)
        return real(plan, key, **options)  # type: ignore[arg-type]

    def counting_run(plan: MergePlan, keys: list[str], **options: object) -> object:
        merged = real_run(plan, keys, **options)  # type: ignore[arg-type]
        calls.extend(key for key, _ in merged or ())
        return merged

    monkeypatch.setattr(export_module, "merge_key", counting)
    monkeypatch.setattr(export_module, "merge_run", counting_run)
    return calls


def test_an_interrupted_export_resumes_into_the_bytes_of_an_uninterrupted_one_merging_only_the_rest(
    tiny_models: dict, tmp_path: Path, reference: Callable[[float], bytes], merge_calls: list[str]
) -> None:
    expected = reference(0.5)
    merge_calls.clear()
    out = tmp_path / "o.safetensors"
    plan = _plan(tiny_models)
    _interrupted(plan, out)
    assert _export_files(tmp_path) == [".o.safetensors.partial", ".o.safetensors.partial.journal"]
    first = list(merge_calls)
    merge_calls.clear()

    notices: list[str] = []
    seen: list[tuple[int, int, int, int]] = []
    export_merge(plan, out, notify=notices.append, progress=_stop_after(10**9, seen))

    assert out.read_bytes() == expected
    assert notices == [f"resuming: {STOP_AFTER} of 1134 keys already merged"]
    assert set(first).isdisjoint(merge_calls) and set(first) | set(merge_calls) == _merged_keys(plan)
    assert len(merge_calls) == len(set(merge_calls))
    total_bytes = seen[0][3]
    assert seen[0][:2] == (STOP_AFTER, 1134) and 0 < seen[0][2] < total_bytes
    assert seen[-1] == (1134, 1134, total_bytes, total_bytes) and len(seen) == 1134 - STOP_AFTER + 1
    assert _export_files(tmp_path) == ["o.safetensors"]  # partial file and journal gone
    plan.close()


def test_an_export_interrupted_in_another_order_resumes_into_the_same_bytes(
    tiny_models: dict,
    tmp_path: Path,
    reference: Callable[[float], bytes],
    merge_calls: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Keys written out of the layout's order (``read_order`` reversed here): the journal holds the
    ones written, wherever they lie in the file, and the resumed export writes the others into the
    bytes of an uninterrupted export in A's order."""
    expected = reference(0.5)
    merge_calls.clear()
    monkeypatch.setattr(export_module, "read_order", lambda sizes: [key for key, _ in sizes][::-1])
    out = tmp_path / "o.safetensors"
    plan = _plan(tiny_models)
    _interrupted(plan, out)
    first = list(merge_calls)
    merge_calls.clear()
    export_merge(plan, out)
    assert out.read_bytes() == expected
    assert set(first).isdisjoint(merge_calls) and set(first) | set(merge_calls) == _merged_keys(plan)
    plan.close()


KILLED_EXPORT = """
import json, os, signal, sys
from pathlib import Path
from automerge.merge import export_merge, plan_merge, recipe_from_data

data, out, keys = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])

def die(done_keys, total_keys, done_bytes, total_bytes):
    if done_keys >= keys:
        os.kill(os.getpid(), signal.SIGKILL)

plan = plan_merge(recipe_from_data(json.loads(data), source="test.yaml"), source="test.yaml")
export_merge(plan, out, progress=die)
"""


@pytest.mark.slow
@pytest.mark.in_flight
def test_a_process_killed_with_sigkill_is_resumed_by_the_next_run(
    tiny_models: dict, tmp_path: Path, reference: Callable[[float], bytes], merge_calls: list[str]
) -> None:
    """A real SIGKILL after some keys (the process kills itself from the progress callback), with
    writes in flight: the journal, flushed to the kernel per key, survives it and holds every key
    reported (and those written since, up to ``SMALL_WRITES_IN_FLIGHT`` of these small keys)."""
    expected = reference(0.5)
    merge_calls.clear()
    out = tmp_path / "o.safetensors"
    data = json.dumps(_recipe_data(tiny_models, 0.5))
    killed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(KILLED_EXPORT), data, str(out), str(STOP_AFTER)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()

    notices: list[str] = []
    with _plan(tiny_models) as plan:
        export_merge(plan, out, notify=notices.append)
        assert len(merge_calls) < len(_merged_keys(plan))
    resumed = re.fullmatch(r"resuming: (\d+) of 1134 keys already merged", " ".join(notices))
    in_flight = max(export_module.WRITES_IN_FLIGHT, export_module.SMALL_WRITES_IN_FLIGHT)
    assert resumed and STOP_AFTER <= int(resumed.group(1)) <= STOP_AFTER + in_flight
    assert out.read_bytes() == expected


def _last_record(journal: Path) -> dict:
    return json.loads(journal.read_bytes().splitlines()[-1])


def _corrupt_last_tensor(partial: Path, journal: Path) -> None:
    record = _last_record(journal)
    with partial.open("r+b") as file:
        file.seek(record["begin"])
        byte = file.read(1)
        file.seek(record["begin"])
        file.write(bytes([byte[0] ^ 0xFF]))


def _truncate_inside_last_tensor(partial: Path, journal: Path) -> None:
    record = _last_record(journal)
    os.truncate(partial, (record["begin"] + record["end"]) // 2)


def _tear_a_record_onto_the_journal(partial: Path, journal: Path) -> None:
    with journal.open("ab") as file:
        file.write(b'{"key": "model.diffusion_model.out.2.weight", "be')


@pytest.mark.parametrize(
    ("damage", "resumed"),
    [
        (_corrupt_last_tensor, STOP_AFTER - 1),
        (_truncate_inside_last_tensor, STOP_AFTER - 1),
        (_tear_a_record_onto_the_journal, STOP_AFTER),
    ],
)
def test_a_torn_last_write_is_detected_and_redone(
    damage: Callable[[Path, Path], None],
    resumed: int,
    tiny_models: dict,
    tmp_path: Path,
    reference: Callable[[float], bytes],
) -> None:
    out = tmp_path / "o.safetensors"
    with _plan(tiny_models) as plan:
        # STOP_AFTER keys sit on a boundary whose last tensor has bytes (an empty one cannot tear)
        _interrupted(plan, out)
        partial, journal = partial_paths(out)
        assert _last_record(journal)["end"] > _last_record(journal)["begin"]
        damage(partial, journal)
        notices: list[str] = []
        export_merge(plan, out, notify=notices.append)
    assert notices == [f"resuming: {resumed} of 1134 keys already merged"]
    assert out.read_bytes() == reference(0.5)


def test_a_changed_recipe_discards_the_partial_merge_and_exports_the_new_one(
    tiny_models: dict, tmp_path: Path, reference: Callable[[float], bytes], merge_calls: list[str]
) -> None:
    expected = reference(0.7)
    out = tmp_path / "o.safetensors"
    with _plan(tiny_models, alpha=0.3) as plan:
        _interrupted(plan, out)
    merge_calls.clear()
    notices: list[str] = []
    with _plan(tiny_models, alpha=0.7) as plan:
        export_merge(plan, out, notify=notices.append)
        assert set(merge_calls) == _merged_keys(plan)  # nothing of alpha 0.3 was kept
    assert notices == [
        "discarded the partial merge .o.safetensors.partial: the recipe changed since it was started; starting over"
    ]
    assert out.read_bytes() == expected


def test_a_source_changed_on_disk_discards_the_partial_merge(tiny_models: dict, tmp_path: Path) -> None:
    models = {**tiny_models, "b": tmp_path / "b.safetensors"}
    shutil.copyfile(tiny_models["b"], models["b"])
    out = tmp_path / "o.safetensors"
    with _plan(models) as plan:
        _interrupted(plan, out, keys=3)
    stat = models["b"].stat()
    os.utime(models["b"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    notices: list[str] = []
    with _plan(models) as plan:
        export_merge(plan, out, notify=notices.append)
    assert notices == [
        "discarded the partial merge .o.safetensors.partial: model b (b.safetensors) changed since it was "
        "started; starting over"
    ]


def test_another_output_dtype_discards_the_partial_merge_naming_the_dtype(
    tiny_models: dict, tmp_path: Path
) -> None:
    """The same recipe exported in another dtype (``--dtype``) is another file: the notice names the
    output dtype (the header's tensor dtypes change too, but the dtype is what the user changed)."""
    out = tmp_path / "o.safetensors"
    with _plan(tiny_models) as plan:
        with pytest.raises(Killed):
            export_merge(plan, out, dtype=torch.float32, progress=_stop_after(3))
    notices: list[str] = []
    with _plan(tiny_models) as plan:
        export_merge(plan, out, dtype=torch.float16, notify=notices.append)
    assert notices == [
        "discarded the partial merge .o.safetensors.partial: the output dtype changed since it was started; "
        "starting over"
    ]


def test_nothing_is_at_the_output_path_until_the_end_and_an_old_file_stays_meanwhile(
    tiny_models: dict, tmp_path: Path, reference: Callable[[float], bytes]
) -> None:
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"an earlier export")
    seen: list[bytes] = []
    stopped: list[bool] = []

    def watch(done_keys: int, *counts: int) -> None:
        seen.append(out.read_bytes())
        if done_keys == STOP_AFTER and not stopped:  # the first run only
            stopped.append(True)
            raise Killed

    with _plan(tiny_models) as plan:
        with pytest.raises(Killed):
            export_merge(plan, out, progress=watch)
        assert out.read_bytes() == b"an earlier export"
        export_merge(plan, out, progress=watch)
    assert set(seen) == {b"an earlier export"} and len(seen) == 1134 + 2
    assert out.read_bytes() == reference(0.5)


def test_an_error_in_the_inputs_deletes_the_partial_merge(tiny_models: dict, tmp_path: Path) -> None:
    """A NaN in a source fails the same way on every run: nothing is kept for a resume."""
    tensors = load_file(tiny_models["b"])
    key = "model.diffusion_model.output_blocks.5.0.out_layers.3.weight"
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, tmp_path / "b.safetensors", metadata={"format": "pt"})
    out = tmp_path / "o.safetensors"
    with _plan({**tiny_models, "b": tmp_path / "b.safetensors"}) as plan:
        with pytest.raises(MergeError, match=re.escape(key)):
            export_merge(plan, out)
    assert _export_files(tmp_path) == ["b.safetensors"]


def test_a_second_run_onto_the_same_output_is_refused_while_the_first_writes(
    tiny_models: dict, tmp_path: Path, reference: Callable[[float], bytes]
) -> None:
    out = tmp_path / "o.safetensors"
    refused: list[str] = []

    def start_another(done_keys: int, *counts: int) -> None:
        if done_keys == 5:
            with pytest.raises(ConfigError, match="another automerge run is writing it") as error:
                export_merge(plan, out)
            refused.append(str(error.value))

    with _plan(tiny_models) as plan:
        export_merge(plan, out, progress=start_another)
    assert len(refused) == 1 and out.read_bytes() == reference(0.5)


# -- the command line ---------------------------------------------------------------------------------


@pytest.mark.in_flight
def test_automerge_merge_says_what_it_keeps_when_interrupted_and_resumes_from_it(
    tiny_models: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(_recipe_data(tiny_models, 0.5)))  # JSON is YAML
    out = tmp_path / "o.safetensors"
    real, real_run = export_module.merge_key, export_module.merge_run
    calls: list[str] = []

    def interrupted_on_the_100th(plan: MergePlan, key: str, **options: object) -> torch.Tensor:
        calls.append(key)
        if len(calls) >= 100:
            raise KeyboardInterrupt
        return real(plan, key, **options)  # type: ignore[arg-type]

    def run_interrupted_on_the_100th(plan: MergePlan, keys: list[str], **options: object) -> object:
        calls.extend(keys)
        if len(calls) >= 100:
            raise KeyboardInterrupt
        return real_run(plan, keys, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(export_module, "merge_key", interrupted_on_the_100th)
    monkeypatch.setattr(export_module, "merge_run", run_interrupted_on_the_100th)
    first = run_cli(capsys, "merge", recipe, "-o", out)
    assert first.code == 130 and not out.exists()
    kept = re.search(r"(\d+) of 1134 keys merged are kept: run the same command again to resume", first.out)
    assert kept, first.out

    monkeypatch.setattr(export_module, "merge_key", real)
    monkeypatch.setattr(export_module, "merge_run", real_run)
    second = run_cli(capsys, "merge", recipe, "-o", out)
    assert second.code == 0, second.err
    assert f"resuming: {kept.group(1)} of 1134 keys already merged" in second.out
    assert out.exists() and not partial_paths(out)[0].exists()


def test_the_progress_line_counts_keys_and_takes_its_rate_from_this_runs_bytes_only() -> None:
    """The ETA: a resumed merge's earlier bytes are where the bar starts, not bytes merged at once."""
    console = Console(file=StringIO(), force_terminal=True, width=120)
    with MergeProgress(console, label="merging") as progress:
        progress(300, 1134, 6000, 10_000)  # resumed: 6000 bytes already in the file
        progress(301, 1134, 7000, 10_000)
        progress(302, 1134, 8000, 10_000)
        task = progress._progress.tasks[0]
        # the rate is estimated from the advances of this run only: 2000 bytes, not 8000
        assert task.completed == 8000 and sum(sample.completed for sample in task._progress) == 2000
        console.print(progress._progress.get_renderable())
    shown = console.file.getvalue()  # type: ignore[attr-defined]
    assert "302/1134 keys" in shown and "ETA" in shown
