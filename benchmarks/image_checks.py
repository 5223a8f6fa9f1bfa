"""How often the image-statistics check (``automerge/render/checks.py``: noise and saturation against
the baselines' renders) would fail a sound merge, and whether it catches broken images.

For each problem (the demo's tiny SD1 weighted sum; a TIES merge of tiny SDXL with alpha up to 1.5 and
density 0.1–1), the baselines are rendered as a study renders them, then ``--merges`` random points of
the search space: every one the check flags is a false alarm. Controls: the midpoint's images with
Gaussian noise (σ 8 and 25 levels), colour ×2.5, a 2-px blur, greyscale. Prints a table, writes JSON.

    python benchmarks/image_checks.py --merges 40 --json benchmarks/results/image_checks.json
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml
from _common import ROOT, machine_info, print_table, quiet_libraries, work_folder, write_json
from PIL import Image, ImageEnhance, ImageFilter

from automerge.render.checks import image_stats, stats_outlier
from automerge.study import StudyRuntime, load_study_file

PROBLEMS: dict[str, dict] = {
    "demo-sd1-weighted_sum": {},  # studies/demo.yaml as shipped
    "sdxl-ties-alpha1.5": {
        "models": {"a": "a.safetensors", "b": "b.safetensors", "c": "c.safetensors"},
        "generate": {
            "c": {"tiny": "sdxl", "seed": 1},
            "a": {"tiny": "sdxl", "seed": 2, "like": "c", "delta": 0.5},
            "b": {"tiny": "sdxl", "seed": 3, "like": "c", "delta": 0.5},
        },
        "method": "ties",
        "search": {"alpha": {"blocks": "all", "low": 0.0, "high": 1.5}, "density": {"low": 0.1, "high": 1.0}},
        "reward": {"reference": {"metric": "mse", "target": {"params": {"alpha": 0.7, "density": 0.5}}}},
    },
}


def _noisy(sigma: float) -> Callable[[Image.Image], Image.Image]:
    def change(image: Image.Image) -> Image.Image:
        pixels = np.asarray(image).astype(np.float32)
        pixels += np.random.default_rng(0).normal(0, sigma, pixels.shape)
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))

    return change


CONTROLS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "noise σ8": _noisy(8),
    "noise σ25": _noisy(25),
    "colour ×2.5": lambda image: ImageEnhance.Color(image).enhance(2.5),
    "blur 2 px": lambda image: image.filter(ImageFilter.GaussianBlur(2)),
    "greyscale": lambda image: image.convert("L").convert("RGB"),
}


def study_file(name: str, folder: Path) -> Path:
    demo = yaml.safe_load((ROOT / "studies" / "demo.yaml").read_text())
    data = {**demo, "name": name, **PROBLEMS[name]}
    data["models"] = {letter: str(folder / name / Path(path).name) for letter, path in data["models"].items()}
    data["payloads"] = [str(ROOT / "payloads" / "tiny.yaml")]
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def measure(path: Path, merges: int, seed: int) -> dict:
    runtime = StudyRuntime(load_study_file(path))
    try:
        space = runtime.space
        baselines = []
        for baseline in space.baselines():
            images = runtime.evaluate(space.block_params(baseline.values), runtime.jobs).images
            baselines.append({key: image_stats(image).as_list() for key, image in images.items()})
        rng = random.Random(seed)
        flagged = []
        for index in range(merges):
            values = {d.name: rng.uniform(d.low, d.high) for d in space.dimensions}
            images = runtime.evaluate(space.block_params(values), runtime.jobs).images
            reason = stats_outlier({k: image_stats(im) for k, im in images.items()}, baselines)
            if reason is not None:
                flagged.append({"merge": index, "values": values, "reason": reason})
        middle = {d.name: (d.low + d.high) / 2 for d in space.dimensions}
        images = runtime.evaluate(space.block_params(middle), runtime.jobs).images
        controls = {
            name: stats_outlier({k: image_stats(change(im)) for k, im in images.items()}, baselines)
            for name, change in CONTROLS.items()
        }
    finally:
        runtime.close()
    return {"merges": merges, "false_alarms": flagged, "controls": controls, "images": len(images)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--merges", type=int, default=40, help="random merges per problem")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "image_checks.json")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    results = {}
    with work_folder(args.workdir, prefix="image-checks-") as folder, quiet_libraries():
        for name in PROBLEMS:
            results[name] = measure(study_file(name, folder), args.merges, args.seed)
    rows = [
        [
            name,
            str(result["merges"]),
            str(len(result["false_alarms"])),
            *("flagged" if result["controls"][control] else "passed" for control in CONTROLS),
        ]
        for name, result in results.items()
    ]
    print_table(
        rows, title="image statistics check", columns=["problem", "merges", "false alarms", *CONTROLS]
    )
    write_json(args.json, {"machine": machine_info("cpu"), "problems": results})
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
