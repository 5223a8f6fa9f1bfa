"""The reference plug-in: SSIM and −MSE against a reference image per key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from automerge.errors import RewardError
from automerge.rewards import ReferenceReward, RewardContext, load_reward
from automerge.rewards.reference import gaussian_window, negative_mse, ssim
from automerge.testing.tiny_rewards import tiny_image, write_reference


def _constant(value: float, size: int = 16) -> torch.Tensor:
    return torch.full((3, size, size), value, dtype=torch.float64)


def test_ssim_of_identical_images_is_one_and_mse_zero() -> None:
    x = torch.rand(3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    assert negative_mse(x, x) == 0.0


def test_ssim_of_constant_images_matches_the_luminance_term() -> None:
    # σ = 0 everywhere, so SSIM = (2ab + C1) / (a² + b² + C1)
    a, b, c1 = 0.2, 0.6, 0.01**2
    assert ssim(_constant(a), _constant(b)) == pytest.approx(
        (2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9
    )


def test_negative_mse_is_minus_the_mean_squared_difference() -> None:
    assert negative_mse(_constant(0.25), _constant(0.75)) == pytest.approx(-0.25)


def test_ssim_is_symmetric() -> None:
    generator = torch.Generator().manual_seed(1)
    x, y = (torch.rand(3, 20, 24, dtype=torch.float64, generator=generator) for _ in range(2))
    assert ssim(x, y) == pytest.approx(ssim(y, x), abs=1e-12)


def test_gaussian_window_sums_to_one_and_is_symmetric() -> None:
    window = gaussian_window(11, 1.5)
    assert float(window.sum()) == pytest.approx(1.0)
    assert torch.equal(window, window.flip(0))


def test_ssim_smaller_image_than_window_raises() -> None:
    with pytest.raises(RewardError, match="smaller than the 11-px window"):
        ssim(_constant(0.5, 8), _constant(0.5, 8))


@pytest.mark.parametrize("metric", ["ssim", "mse"])
def test_identical_image_scores_higher_than_a_different_one(metric: str, tmp_path: Path) -> None:
    reward = load_reward(write_reference(tmp_path, metric=metric))
    same, other = tiny_image(0), tiny_image(9)
    scores = reward.score([same, other], ["", ""], keys=["item0-s1", "item0-s1"]).scores
    assert scores[0] == pytest.approx(1.0 if metric == "ssim" else 0.0)
    assert scores[0] > scores[1]


def test_references_in_memory_need_no_folder() -> None:
    target = tiny_image(3)
    reward = ReferenceReward.from_images({"k": target}, metric="mse")
    assert reward.score([target, tiny_image(4)], ["", ""], keys=["k", "k"])[0] == 0.0


def test_manifest_without_directory_uses_context_images(tmp_path: Path) -> None:
    manifest = tmp_path / "ref.yaml"
    manifest.write_text("reward: reference\noptions: {metric: ssim}\n")
    reward = load_reward(manifest, context=RewardContext(reference_images={"k": tiny_image(3)}))
    assert reward.score([tiny_image(3)], [""], keys=["k"]).scores[0] == pytest.approx(1.0)


def test_manifest_without_any_reference_raises(tmp_path: Path) -> None:
    manifest = tmp_path / "ref.yaml"
    manifest.write_text("reward: reference\n")
    with pytest.raises(RewardError, match="needs options.directory"):
        load_reward(manifest)


def test_missing_reference_for_a_key_raises(tmp_path: Path) -> None:
    reward = load_reward(write_reference(tmp_path))
    with pytest.raises(RewardError, match="no reference image .*item9-s9.png for key 'item9-s9'"):
        reward.score([tiny_image(0)], [""], keys=["item9-s9"])


def test_key_that_leaves_the_folder_raises(tmp_path: Path) -> None:
    reward = load_reward(write_reference(tmp_path))
    with pytest.raises(RewardError, match="not a relative name"):
        reward.score([tiny_image(0)], [""], keys=["../item0-s1"])


def test_size_mismatch_with_the_reference_raises(tmp_path: Path) -> None:
    reward = load_reward(write_reference(tmp_path))
    with pytest.raises(RewardError, match="is 32×32 px but its reference is 64×64 px"):
        reward.score([tiny_image(0, size=(32, 32))], [""], keys=["item0-s1"])


def test_scoring_without_keys_raises(tmp_path: Path) -> None:
    reward = load_reward(write_reference(tmp_path))
    with pytest.raises(RewardError, match="pass keys="):
        reward.score([tiny_image(0)], ["a cat"])


def test_unreadable_reference_file_raises(tmp_path: Path) -> None:
    manifest = write_reference(tmp_path)
    (tmp_path / "refs" / "item1-s2.png").write_bytes(b"not a png")
    reward = load_reward(manifest)
    with pytest.raises(RewardError, match="cannot be read as an image"):
        reward.score([tiny_image(1)], [""], keys=["item1-s2"])


def test_grayscale_input_is_compared_in_rgb() -> None:
    target = tiny_image(3).convert("L")
    reward = ReferenceReward.from_images({"k": target.convert("RGB")})
    assert reward.score([target], [""], keys=["k"])[0] == pytest.approx(1.0)
    assert isinstance(target, Image.Image)
