"""A fast study on tiny SD1 models: one 64×64 image per trial, 2 steps, no CFG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_study(tmp_path: Path, tiny_models: dict[str, Path]):
    payload = tmp_path / "payload.yaml"
    payload.write_text(
        yaml.safe_dump(
            {
                "defaults": {
                    "steps": 2,
                    "cfg": 1.0,
                    "width": 64,
                    "height": 64,
                    "scheduler": "euler",
                    "seeds": [7],
                },
                "items": [{"prompt": "a red house"}, {"prompt": "a blue boat", "seeds": [3]}],
            }
        )
    )

    def make(**changes: Any) -> Path:
        data: dict[str, Any] = {
            "name": "test-study",
            "models": {"a": str(tiny_models["a"]), "b": str(tiny_models["b"])},
            "method": "weighted_sum",
            "search": {"alpha": {"groups": {"TEXT": ["BASE"], "UNET": ["IN00", "IN01", "OUT11"]}}},
            "payloads": [str(payload)],
            "reward": {
                "reference": {"metric": "mse", "target": {"params": {"alpha": {"default": 0.3, "BASE": 0.8}}}}
            },
            "sampler": {"name": "random", "seed": 0, "startup_trials": 2},
            "trials": 5,
            "early_stopping": None,
            "render": {"device": "cpu"},
        }
        data.update(changes)
        path = tmp_path / "study.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return make
