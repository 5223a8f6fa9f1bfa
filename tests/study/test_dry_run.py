"""`automerge optimize --dry-run`: the plan of a study from headers alone — dimensions, images per
trial, the memory plan (equal to what the live engine then holds), a time only when measured, and
exit 2 with the setting to change when it cannot fit."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import run_cli

from automerge.arch import ARCHITECTURES, reference_keys
from automerge.checkpoints._safetensors_reader import SafetensorsCheckpoint
from automerge.study import StudyRuntime, load_study_file
from automerge.study.dry_run import dry_run


def test_the_memory_plan_is_what_the_live_engine_holds(make_study) -> None:
    study = load_study_file(make_study())
    plan = dry_run(study)
    assert plan.images_per_trial == 2 and plan.dimensions == ["alpha.TEXT", "alpha.UNET"]
    runtime = StudyRuntime(study)
    try:
        blocks = runtime.session.engine._blocks.values()
        held = sum(
            t.numel() * t.element_size() for block in blocks for t in [*block.sources.values(), block.out]
        )
    finally:
        runtime.close()
    assert plan.total("device") == held
    assert plan.seconds_per_trial is None  # not run yet, not calibrated: no guess


def test_a_ties_study_plans_its_ranks_and_the_merged_deltas_of_blocks_searched_in_alpha_alone(
    make_study, tiny_models
) -> None:
    models = {name: str(tiny_models[name]) for name in "abc"}
    search = {
        "alpha": {"groups": {"TEXT": ["BASE"], "UNET": ["IN00", "IN01", "OUT11"]}},
        "density": {"groups": {"IN": ["IN00"]}},
    }
    plan = dry_run(load_study_file(make_study(models=models, method="ties", search=search)))
    items = {item.name: item.bytes for item in plan.memory}
    live = next(size for name, size in items.items() if name.startswith("live"))  # fp32 on the CPU
    ranks = items["ties ranks / draws per element (live re-merge)"]  # int32 for 2 models, VAE unmerged
    merged = items["merged deltas of the blocks whose α alone is searched"]  # BASE, IN01, OUT11: fp32
    assert live < ranks < 2 * live and 0 < merged < ranks / 2


def test_a_block_is_alpha_only_when_no_other_method_parameter_is_searched_there() -> None:
    from automerge.study.dry_run import _alpha_only_blocks
    from automerge.study.space import Dimension

    def dimension(param: str, *blocks: str) -> Dimension:
        return Dimension(f"{param}.x", param, blocks, 0.0, 1.0, None, False)

    dimensions = [
        dimension("alpha", "BASE", "IN00", "OUT11"),
        dimension("density", "IN00"),
        dimension("lora.style"),
    ]
    assert _alpha_only_blocks(dimensions) == {"BASE", "OUT11"}  # IN00's density changes its merged delta


def test_on_a_cpu_host_and_device_memory_are_one_and_on_a_gpu_the_host_is_checked_on_its_own() -> None:
    from automerge.study.config import RenderConfig
    from automerge.study.dry_run import GIB, DryRun, MemoryItem, _problems

    def plan(device: str, free_device: int, free_host: int) -> DryRun:
        memory = [MemoryItem("sources", 3 * GIB, "host"), MemoryItem("live", 2 * GIB, "device")]
        return DryRun("sd1", "weighted_sum", [], [], 1, 1, device, memory, free_device, free_host)

    config = RenderConfig()
    assert _problems(plan("cpu", 6 * GIB, 6 * GIB), config, torch.device("cpu")) == []  # 5 of 6 GiB: fits
    (cpu,) = _problems(plan("cpu", 5 * GIB, 6 * GIB), config, torch.device("cpu"))  # 5 GiB > 85 % of 5
    assert cpu.startswith("the plan needs 5.0 GiB on cpu but 5.0 GiB is free")
    (host,) = _problems(plan("cuda", 8 * GIB, 3 * GIB), config, torch.device("cuda"))  # device fits, host not
    assert host.startswith("the plan needs 3.0 GiB of host memory but 3.0 GiB is available")


def test_a_folder_is_sized_by_its_weight_files_alone(tmp_path: Path) -> None:
    from automerge.study.dry_run import _size_on_disk

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "head.pth").write_bytes(b"x" * 200)
    (tmp_path / "tokenizer.json").write_bytes(b"x" * 5000)  # configs and tokenizers are not held as weights
    assert _size_on_disk(tmp_path) == 1200
    assert _size_on_disk(tmp_path / "head.pth") == 200 and _size_on_disk(tmp_path / "missing") == 0


def test_dry_run_prints_the_plan_and_runs_nothing(make_study, capsys) -> None:
    path = make_study()
    result = run_cli(capsys, "optimize", path, "--dry-run")
    assert result.code == 0, result.err
    for text in ("search dimensions: 2", "images per trial: 2", "memory plan", "total on device", "fits"):
        assert text in result.out
    assert "--calibrate" in result.out
    assert not (path.parent / f"{path.stem}.db").exists()  # no study was created
    calibrated = run_cli(capsys, "optimize", path, "--dry-run", "--calibrate")
    assert calibrated.code == 0, calibrated.err
    assert "s per trial (one calibration trial)" in calibrated.out


def test_a_plan_that_cannot_fit_exits_2_with_the_setting_to_change(make_study, monkeypatch, capsys) -> None:
    monkeypatch.setattr("automerge.study.dry_run.free_bytes", lambda device: 1 << 20)  # 1 MiB free
    result = run_cli(capsys, "optimize", make_study(), "--dry-run")
    assert result.code == 2
    assert "GiB is free" in result.err and "render.source_dtype: fp16" in result.err
    assert "Traceback" not in result.err and len(result.err.strip().splitlines()) == 1


def _sparse_real_size(family: str, path: Path) -> int:
    """A real-size checkpoint of ``family`` whose data is a sparse hole (header-only use); returns
    the numel of its float tensors."""
    arch = ARCHITECTURES.get(family)
    header, offset, numel = {}, 0, 0
    for ref in reference_keys(family):
        if (
            ref.component in ("ema", "scheduler")
            or ref.dtype != "float32"
            or arch.component_of(ref.key) is None
        ):
            continue
        count = 1
        for size in ref.shape:
            count *= size
        header[ref.key] = {
            "dtype": "F16",
            "shape": list(ref.shape),
            "data_offsets": [offset, offset + 2 * count],
        }
        offset += 2 * count
        numel += count
    header["cond_stage_model.transformer.text_model.embeddings.position_ids"] = {
        "dtype": "I64",
        "shape": [1, 77],
        "data_offsets": [offset, offset + 8 * 77],
    }
    offset += 8 * 77
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(text)) + text)
        file.truncate(8 + len(text) + offset)
    return numel


def test_dry_run_sizes_a_real_size_sd1_study_from_headers_alone(tmp_path: Path, monkeypatch) -> None:
    numel_a = _sparse_real_size("sd1", tmp_path / "a.safetensors")
    _sparse_real_size("sd1", tmp_path / "b.safetensors")
    payload = tmp_path / "p.yaml"
    payload.write_text(
        yaml.safe_dump(
            {
                "defaults": {"width": 512, "height": 512, "steps": 20, "cfg": 7.0, "seeds": [1, 2]},
                "items": [{"prompt": "x"}],
            }
        )
    )
    study_path = tmp_path / "real.yaml"
    study_path.write_text(
        yaml.safe_dump(
            {
                "name": "real",
                "models": {"a": "a.safetensors", "b": "b.safetensors"},
                "method": "weighted_sum",
                "search": {"alpha": {"blocks": "all"}},
                "payloads": ["p.yaml"],
                "reward": {"reference": {"metric": "mse", "target": {"params": {"alpha": 0.5}}}},
                "render": {"device": "cpu", "source_dtype": "fp16"},
            }
        )
    )

    def no_tensor_reads(self, key):  # noqa: ANN001, ANN202 - the patched method's signature
        raise AssertionError(f"--dry-run read tensor {key}")

    monkeypatch.setattr(SafetensorsCheckpoint, "load", no_tensor_reads)
    plan = dry_run(load_study_file(study_path))
    assert plan.family == "sd1" and len(plan.dimensions) == 26 and plan.images_per_trial == 2
    sources = [item for item in plan.memory if item.name.startswith("source")]
    live = next(item for item in plan.memory if item.name.startswith("live"))
    # every merged float key of the real table: fp16 sources, fp32 live weights (CPU)
    merged = sum(item.bytes for item in sources) // 4
    assert 0.95 * numel_a < merged <= numel_a and live.bytes == 4 * merged
    assert 1.0e9 < merged < 1.1e9  # SD1: ~1.07 B parameters (UNet 860 M, CLIP-L 123 M, VAE 84 M)


EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "studies").glob("*.yaml"))


@pytest.mark.parametrize("example", [p for p in EXAMPLES if p.stem != "demo"], ids=lambda p: p.stem)
def test_every_example_study_checks_and_plans_with_its_models_swapped_for_tiny_ones(
    example: Path, tmp_path: Path
) -> None:
    """studies/ holds real examples next to the demo (issue 14): each one, pointed at tiny models of
    its family, passes every check and gets a memory plan (its reward weights need not be fetched)."""
    from automerge.tiny import write_tiny

    data = yaml.safe_load(example.read_text(encoding="utf-8"))
    family = "sdxl" if "sdxl" in example.stem else "sd1"
    first = write_tiny(family, tmp_path / "a.safetensors", seed=1)
    models = {
        name: first
        if name == "a"
        else write_tiny(family, tmp_path / f"{name}.safetensors", seed=2, like=first)
        for name in data["models"]
    }
    data["models"] = {name: str(path) for name, path in models.items()}
    root = example.parent
    data["payloads"] = [str((root / p).resolve()) for p in data["payloads"]]
    data["validation_payloads"] = [str((root / p).resolve()) for p in data.get("validation_payloads", [])]
    if isinstance(data["reward"], str) and data["reward"].endswith(".yaml"):
        data["reward"] = str((root / data["reward"]).resolve())
    data["render"] = {**data.get("render", {}), "device": "cpu"}
    copy = tmp_path / "studies" / example.name
    copy.parent.mkdir()
    copy.write_text(yaml.safe_dump(data))
    plan = dry_run(load_study_file(copy))
    assert plan.family == family and plan.dimensions and plan.images_per_trial > 0
    assert any(item.name.startswith("reward") for item in plan.memory)
    assert example.read_text(encoding="utf-8").startswith("# ")  # the header says what to edit
    assert "VRAM class" in example.read_text(encoding="utf-8")


def test_calibration_times_one_trial_after_a_warm_up_at_two_points_inside_the_ranges(
    make_study, monkeypatch
) -> None:
    """Two full trials (merge, render, score) at the range's midpoint and quarter point; the second is
    the one timed (its duration is measured in benchmarks, not asserted here)."""
    calls = []
    evaluate = StudyRuntime.evaluate

    def spy(self, params, jobs, *args, **kwargs):
        calls.append((params, len(jobs)))
        return evaluate(self, params, jobs, *args, **kwargs)

    monkeypatch.setattr(StudyRuntime, "evaluate", spy)
    study = load_study_file(
        make_study(search={"alpha": {"low": 0.2, "high": 0.6, "groups": {"ALL": ["BASE", "IN00"]}}})
    )
    plan = dry_run(study, calibrate=True)
    assert plan.seconds_per_trial is not None and plan.timing_source == "one calibration trial"
    assert [count for _, count in calls] == [2, 2]  # both payload images, twice
    alphas = [params.values["alpha"] for params, _ in calls]
    assert [(a["BASE"], a["IN00"]) for a in alphas] == [pytest.approx((0.4, 0.4)), pytest.approx((0.3, 0.3))]
