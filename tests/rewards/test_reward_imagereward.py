"""ImageReward ported onto transformers' BLIP: key remap, tokenizer, preprocessing, scoring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from automerge.errors import RewardError
from automerge.rewards import load_reward
from automerge.rewards.imagereward import (
    IMAGEREWARD_MEAN,
    IMAGEREWARD_STD,
    ImageRewardNet,
    load_bert_tokenizer,
    read_med_config,
    remap_imagereward_state_dict,
    to_official_imagereward_state_dict,
)
from automerge.rewards.preprocess import CLIP_MEAN, CLIP_STD, center_crop_box, clip_transform, resized_size
from automerge.testing.tiny_rewards import (
    TINY_VISION,
    official_imagereward_checkpoint,
    tiny_image,
    tiny_med_config,
    write_bert_vocab,
    write_tiny_imagereward,
)


def _tiny_net(seed: int = 0) -> ImageRewardNet:
    text = read_med_config(None).model_copy(
        update={
            "vocab_size": 21,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 64,
        }
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ImageRewardNet(TINY_VISION.config(), text.config(encoder_hidden_size=TINY_VISION.hidden_size))


def test_official_layout_loads_strictly_after_remap() -> None:
    source, target = _tiny_net(seed=0), _tiny_net(seed=1)
    official = official_imagereward_checkpoint(source)
    assert "blip.visual_encoder.blocks.0.attn.qkv.weight" in official
    assert "blip.visual_encoder.cls_token" in official and "mlp.layers.7.bias" in official
    result = target.load_state_dict(remap_imagereward_state_dict(official), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], tensor), key


def test_remap_inverts_the_official_renaming() -> None:
    state = _tiny_net().state_dict()
    assert remap_imagereward_state_dict(to_official_imagereward_state_dict(state)).keys() == state.keys()


def test_remap_drops_only_the_named_unused_keys() -> None:
    official = official_imagereward_checkpoint(_tiny_net())
    remapped = remap_imagereward_state_dict(official)
    assert (
        len(official) - len(remapped) == 5
    )  # vision_proj.{weight,bias}, text_proj.{weight,bias}, position_ids


def test_remap_rejects_a_key_of_unknown_layout() -> None:
    official = official_imagereward_checkpoint(_tiny_net())
    official["blip.visual_encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(
        RewardError, match=r"1 keys of no known layout \(first: blip.visual_encoder.extra.weight\)"
    ):
        remap_imagereward_state_dict(official)


def test_tokenizer_adds_dec_and_enc_after_the_vocabulary(tmp_path: Path) -> None:
    tokenizer = load_bert_tokenizer(write_bert_vocab(tmp_path / "vocab.txt"))
    assert len(tokenizer) == 21  # 5 specials + 14 words + [DEC] + [ENC] (not the 5-token trap vocabulary)
    assert tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [19, 20]
    encoded = tokenizer(["A photo of cats"], padding="max_length", truncation=True, max_length=35)
    assert encoded["input_ids"][0][:7] == [2, 5, 6, 7, 8, 17, 3]  # [CLS] a photo of cat ##s [SEP]
    assert len(encoded["input_ids"][0]) == 35 and sum(encoded["attention_mask"][0]) == 7


def test_vocab_without_bert_specials_raises(tmp_path: Path) -> None:
    path = tmp_path / "vocab.txt"
    path.write_text("a\nb\n")
    with pytest.raises(
        RewardError, match=r"not a BERT vocabulary \(no \[PAD\], \[UNK\], \[CLS\], \[SEP\] token\)"
    ):
        load_bert_tokenizer(path)


@pytest.mark.parametrize(
    ("size", "expected"),
    [((300, 200), (336, 224)), ((200, 300), (224, 336)), ((224, 224), (224, 224)), ((1000, 999), (224, 224))],
)
def test_resize_keeps_aspect_with_the_short_side_at_the_target(
    size: tuple[int, int], expected: tuple[int, int]
) -> None:
    assert resized_size(*size, 224) == expected


@pytest.mark.parametrize(("width", "left"), [(336, 56), (225, 0), (227, 2), (229, 2)])
def test_center_crop_rounds_the_offset_like_torchvision(width: int, left: int) -> None:
    assert center_crop_box(width, 224, 224) == (left, 0, left + 224, 224)


def test_clip_transform_of_a_constant_image_is_the_normalised_colour() -> None:
    from PIL import Image

    pixels = clip_transform([Image.new("RGB", (48, 40), (255, 0, 128))], size=32)
    assert pixels.shape == (1, 3, 32, 32)
    for channel, value in enumerate((255, 0, 128)):
        expected = (value / 255 - CLIP_MEAN[channel]) / CLIP_STD[channel]
        assert torch.allclose(pixels[0, channel], torch.full((32, 32), expected), atol=1e-6)


def test_score_is_the_normalised_head_output_of_the_network(tmp_path: Path) -> None:
    reward = load_reward(write_tiny_imagereward(tmp_path))
    images, prompts = [tiny_image(0), tiny_image(1, size=(80, 64))], ["a photo of a cat", "a red house"]
    plugin = reward.model
    tokens = plugin.tokenizer(
        prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
    )
    with torch.inference_mode():
        raw = plugin.net(clip_transform(images, size=32), tokens.input_ids, tokens.attention_mask)
    expected = ((raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).tolist()
    assert reward.score(images, prompts).scores == pytest.approx(expected, abs=1e-7)
    assert reward.score(images[:1], prompts[:1]).scores[0] == pytest.approx(expected[0], abs=1e-6)


def test_prompt_changes_the_score(tmp_path: Path) -> None:
    reward = load_reward(write_tiny_imagereward(tmp_path))
    image = tiny_image(0)
    scores = reward.score([image, image], ["a photo of a cat", "the blue tree"]).scores
    assert scores[0] != scores[1]


def test_checkpoint_of_other_sizes_names_the_mismatched_tensor(tmp_path: Path) -> None:
    manifest = write_tiny_imagereward(tmp_path)
    data = yaml.safe_load(manifest.read_text())
    data["options"]["vision"]["intermediate_size"] = 48
    manifest.write_text(yaml.safe_dump(data))
    with pytest.raises(
        RewardError,
        match=r"tensors have other shapes than the model, e.g. vision.encoder.layers.0.mlp.fc1.weight: \(64, 32\) in the file, \(48, 32\)",
    ):
        load_reward(manifest)


def test_checkpoint_with_missing_tensors_is_rejected(tmp_path: Path) -> None:
    manifest = write_tiny_imagereward(tmp_path)
    state = torch.load(tmp_path / "ImageReward.pt", weights_only=True)
    del state["mlp.layers.7.bias"]
    torch.save(state, tmp_path / "ImageReward.pt")
    with pytest.raises(RewardError, match=r"does not fit the model: 1 missing keys \['mlp.layers.7.bias'\]"):
        load_reward(manifest)


def test_invalid_med_config_raises(tmp_path: Path) -> None:
    manifest = write_tiny_imagereward(tmp_path)
    (tmp_path / "med_config.json").write_text("{not json")
    with pytest.raises(RewardError, match=r"med_config.json: not a valid BERT med_config.json"):
        load_reward(manifest)


def test_med_config_without_cross_attention_raises(tmp_path: Path) -> None:
    manifest = write_tiny_imagereward(tmp_path)
    config = {**tiny_med_config(vocab_size=21), "add_cross_attention": False}
    (tmp_path / "med_config.json").write_text(json.dumps(config))
    with pytest.raises(RewardError, match="add_cross_attention must be true"):
        load_reward(manifest)


def test_tokenizer_larger_than_the_text_vocabulary_raises(tmp_path: Path) -> None:
    manifest = write_tiny_imagereward(tmp_path)
    (tmp_path / "med_config.json").write_text(json.dumps(tiny_med_config(vocab_size=20)))
    with pytest.raises(RewardError, match="the tokenizer has 21 tokens but the text encoder only 20"):
        load_reward(manifest)


def test_default_text_sizes_are_the_official_bert_base() -> None:
    med = read_med_config(None)
    assert (med.vocab_size, med.hidden_size, med.num_hidden_layers, med.num_attention_heads) == (
        30524,
        768,
        12,
        12,
    )
    vision = TINY_VISION.model_copy(update={})
    assert type(vision)().hidden_size == 1024 and type(vision)().num_hidden_layers == 24
