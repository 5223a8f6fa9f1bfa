"""Scoring a folder of rendered PNGs, prompts and keys read from their text chunks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from automerge.errors import RewardError
from automerge.rewards import dumps_scores, score_folder
from automerge.testing.tiny_rewards import tiny_image, write_reference


def _save(image: Image.Image, path: Path, **chunks: str) -> None:
    info = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    image.save(path, pnginfo=info)


def test_score_folder_reads_prompt_key_item_and_seed(tmp_path: Path) -> None:
    manifest = write_reference(tmp_path / "reward")
    renders = tmp_path / "renders"
    renders.mkdir()
    _save(
        tiny_image(0),
        renders / "b.png",
        prompt="a cat",
        key="item0-s1",
        item="item0",
        seed="1",
        settings="{}",
    )
    _save(tiny_image(4), renders / "a.png", prompt="a dog", key="item1-s2", item="item1", seed="2")
    scores = score_folder(manifest, renders)
    assert [s.path.name for s in scores] == ["a.png", "b.png"]
    assert [(s.key, s.item, s.seed, s.prompt) for s in scores] == [
        ("item1-s2", "item1", 2, "a dog"),
        ("item0-s1", "item0", 1, "a cat"),
    ]
    assert scores[1].score == pytest.approx(1.0) and scores[0].score < 1.0
    assert scores[1].raw == {"reference": pytest.approx(1.0)}
    rows = [json.loads(line) for line in dumps_scores(scores).splitlines()]
    assert rows[1]["key"] == "item0-s1" and rows[1]["seed"] == 1


def test_key_defaults_to_the_file_stem(tmp_path: Path) -> None:
    manifest = write_reference(tmp_path / "reward")
    renders = tmp_path / "renders"
    renders.mkdir()
    tiny_image(0).save(renders / "item0-s1.png")
    assert score_folder(manifest, renders)[0].key == "item0-s1"


def test_prompt_reward_on_png_without_prompt_chunk_raises(
    tmp_path: Path, tiny_manifests: dict[str, Path]
) -> None:
    tiny_image(0).save(tmp_path / "x.png")
    with pytest.raises(
        RewardError, match=r"x.png: no 'prompt' text chunk, but reward 'clip-score' scores image–prompt pairs"
    ):
        score_folder(tiny_manifests["clip-score"], tmp_path)


def test_folder_without_pngs_raises(tmp_path: Path) -> None:
    manifest = write_reference(tmp_path / "reward")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RewardError, match="no .png images to score"):
        score_folder(manifest, tmp_path / "empty")


def test_bad_seed_chunk_raises(tmp_path: Path) -> None:
    manifest = write_reference(tmp_path / "reward")
    renders = tmp_path / "renders"
    renders.mkdir()
    _save(tiny_image(0), renders / "item0-s1.png", seed="one")
    with pytest.raises(RewardError, match="text chunk 'seed' is 'one', not an integer"):
        score_folder(manifest, renders)
