"""CLIP score, PickScore and the aesthetic predictors on tiny CLIP / SigLIP folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from automerge.errors import RewardError
from automerge.rewards import load_reward
from automerge.rewards.preprocess import clip_transform
from automerge.rewards.pretrained import features
from automerge.testing.tiny_rewards import tiny_image, write_tiny_clip_score, write_tiny_laion_aesthetic


def test_clip_score_is_scaled_cosine_of_image_and_text_embeddings(
    tiny_manifests: dict[str, Path], images: list[Image.Image], prompts: tuple[str, ...]
) -> None:
    from transformers import CLIPModel

    reward = load_reward(tiny_manifests["clip-score"])
    folder = tiny_manifests["clip-score"].parent / "model"
    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    plugin = reward.model
    pixels = plugin.image_processor(images=images, return_tensors="pt")["pixel_values"]
    text = plugin.tokenizer(list(prompts), padding=True, return_tensors="pt")
    with torch.inference_mode():
        image_embeds = features(model.get_image_features(pixel_values=pixels))
        text_embeds = features(
            model.get_text_features(input_ids=text.input_ids, attention_mask=text.attention_mask)
        )
        cosine = torch.nn.functional.cosine_similarity(image_embeds, text_embeds, dim=-1)
        expected = (model.logit_scale.exp() * cosine).tolist()
    assert reward.score(images, prompts).scores == pytest.approx(expected, abs=1e-5)


def test_clip_score_depends_on_the_prompt(tiny_manifests: dict[str, Path]) -> None:
    reward = load_reward(tiny_manifests["clip-score"])
    image = tiny_image(0)
    scores = reward.score([image, image], ["a cat", "a red house"]).scores
    assert scores[0] != scores[1]


def test_pickscore_reads_the_processor_from_its_own_folder(
    tiny_manifests: dict[str, Path], images: list[Image.Image], prompts: tuple[str, ...]
) -> None:
    pick = load_reward(tiny_manifests["pickscore"]).score(images, prompts).scores
    clip = load_reward(tiny_manifests["clip-score"]).score(images, prompts).scores
    assert not (tiny_manifests["pickscore"].parent / "model" / "tokenizer.json").exists()
    assert pick == clip  # same seed, same weights, same formula: only the folder layout differs


def test_missing_tokenizer_files_raise_reward_error(tmp_path: Path) -> None:
    manifest = write_tiny_clip_score(tmp_path, reward="pickscore")
    shutil.rmtree(tmp_path / "processor")
    (tmp_path / "processor").mkdir()
    (tmp_path / "processor" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(
        RewardError,
        match=r"processor: no CLIP tokenizer files \(tokenizer.json, or vocab.json and merges.txt\)",
    ):
        load_reward(manifest)


def test_laion_aesthetic_is_the_head_on_the_unit_image_embedding(
    tiny_manifests: dict[str, Path], images: list[Image.Image]
) -> None:
    from transformers import CLIPModel

    reward = load_reward(tiny_manifests["laion-aesthetic"])
    folder = tiny_manifests["laion-aesthetic"].parent
    model = CLIPModel.from_pretrained(folder / "clip", local_files_only=True).eval()
    head = torch.load(folder / "head.pth", weights_only=True)
    with torch.inference_mode():
        embeds = features(model.get_image_features(pixel_values=clip_transform(images, size=32)))
        x = embeds / embeds.norm(dim=-1, keepdim=True)
        for index in (0, 2, 4, 6, 7):
            x = x @ head[f"layers.{index}.weight"].T + head[f"layers.{index}.bias"]
    assert reward.score(images, ["", ""]).scores == pytest.approx(x.squeeze(-1).tolist(), abs=1e-5)


def test_laion_aesthetic_ignores_the_prompt(tiny_manifests: dict[str, Path]) -> None:
    reward = load_reward(tiny_manifests["laion-aesthetic"])
    image = tiny_image(0)
    first = reward.score([image], ["a cat"]).scores
    assert reward.score([image], ["a red house"]).scores == first


def test_relu_head_option_with_a_linear_head_file_is_rejected(tmp_path: Path) -> None:
    manifest = write_tiny_laion_aesthetic(tmp_path)
    data = yaml.safe_load(manifest.read_text())
    data["options"] = {"relu": True}
    manifest.write_text(yaml.safe_dump(data))
    with pytest.raises(
        RewardError, match=r"head.pth: does not fit the model: 6 missing keys \['layers.11.bias'"
    ):
        load_reward(manifest)


def test_vision_checkpoint_missing_tensors_is_rejected(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    manifest = write_tiny_laion_aesthetic(tmp_path)
    path = tmp_path / "clip" / "model.safetensors"
    state = load_file(path)
    del state["visual_projection.weight"]
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(RewardError, match=r"does not fit .*1 missing keys \['visual_projection.weight'\]"):
        load_reward(manifest)


def test_aesthetic_v25_ignores_the_prompt(tiny_manifests: dict[str, Path]) -> None:
    reward = load_reward(tiny_manifests["aesthetic-v25"])
    image = tiny_image(0)
    first = reward.score([image], ["a cat"]).scores
    assert reward.score([image], ["a red house"]).scores == first
