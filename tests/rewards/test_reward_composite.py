"""Composite rewards: fixed or z-score normalisation, weighted arithmetic or geometric means."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from automerge.errors import RewardError
from automerge.rewards import CompositeReward, ReferenceReward, Reward, load_reward
from automerge.rewards.manifest import AffineNormalize
from automerge.rewards.scoring import ComponentScores, Member, ZScore, combine_components
from automerge.testing.tiny_rewards import tiny_image, write_reference

KEYS = ["item0-s1", "item0-s1", "item1-s2"]


def _component(name: str, weight: float, values: list[float]) -> ComponentScores:
    return ComponentScores(name, weight, tuple(values), tuple(values))


def test_arithmetic_mean_weights_each_component() -> None:
    combined = combine_components(
        [_component("a", 1.0, [1.0, 4.0]), _component("b", 3.0, [5.0, 0.0])], combine="arithmetic"
    )
    assert combined == pytest.approx((4.0, 1.0))


def test_geometric_mean_weights_each_component() -> None:
    combined = combine_components(
        [_component("a", 1.0, [2.0]), _component("b", 2.0, [16.0])], combine="geometric"
    )
    assert combined[0] == pytest.approx(math.exp((math.log(2.0) + 2 * math.log(16.0)) / 3))


def test_geometric_mean_of_a_non_positive_score_names_reward_and_image() -> None:
    with pytest.raises(RewardError, match=r"reward 'b' gave -0.5 for image 1; use combine: arithmetic"):
        combine_components(
            [_component("a", 1.0, [1.0, 1.0]), _component("b", 1.0, [2.0, -0.5])], combine="geometric"
        )


def test_zscore_uses_population_statistics() -> None:
    z = ZScore.fit([1.0, 3.0], name="a")
    assert (z.mean, z.std) == (2.0, 1.0)
    assert z.apply(4.0) == 2.0


def test_zscore_of_constant_baseline_raises() -> None:
    with pytest.raises(RewardError, match="baseline scores are all equal"):
        ZScore.fit([0.5, 0.5, 0.5], name="a")


def _members() -> tuple[Reward, Reward]:
    references = {"item0-s1": tiny_image(0), "item1-s2": tiny_image(1)}
    ssim = Reward(ReferenceReward.from_images(references, metric="ssim", name="ssim"))
    mse = Reward(
        ReferenceReward.from_images(references, metric="mse", name="mse"),
        normalize=AffineNormalize(kind="affine", scale=0.5, offset=-1.0),
    )
    return ssim, mse


def test_composite_keeps_raw_and_normalised_scores_per_reward() -> None:
    ssim, mse = _members()
    composite = CompositeReward([Member(ssim, 1.0, "manifest"), Member(mse, 3.0, "manifest")], name="mix")
    images = [tiny_image(0), tiny_image(5), tiny_image(1)]
    result = composite.score(images, ["", "", ""], keys=KEYS)
    raw_ssim, raw_mse = result.components[0].raw, result.components[1].raw
    assert result.components[1].normalized == pytest.approx([(r + 1.0) / 0.5 for r in raw_mse])
    assert result.scores == pytest.approx(
        [(s + 3 * (m + 1.0) / 0.5) / 4 for s, m in zip(raw_ssim, raw_mse, strict=True)]
    )
    assert result.per_image(0)["raw"] == {"ssim": pytest.approx(1.0), "mse": 0.0}


def test_zscored_member_needs_a_baseline_before_scoring() -> None:
    ssim, mse = _members()
    composite = CompositeReward([Member(ssim, 1.0, "zscore"), Member(mse, 1.0, "manifest")], name="mix")
    with pytest.raises(RewardError, match="member 'ssim' is z-scored but no baseline was set"):
        composite.score([tiny_image(0)], [""], keys=KEYS[:1])


def test_zscored_member_is_normalised_by_baseline_statistics() -> None:
    ssim, mse = _members()
    composite = CompositeReward([Member(ssim, 1.0, "zscore"), Member(mse, 1.0, "manifest")], name="mix")
    baseline_images = [tiny_image(0), tiny_image(5), tiny_image(1)]
    baseline = composite.raw_scores(baseline_images, ["", "", ""], keys=KEYS)
    composite.set_baseline(baseline)
    z = ZScore.fit(baseline["ssim"], name="ssim")
    result = composite.score(baseline_images, ["", "", ""], keys=KEYS)
    assert result.components[0].normalized == pytest.approx([z.apply(v) for v in baseline["ssim"]])
    assert sum(result.components[0].normalized) == pytest.approx(0.0, abs=1e-12)


def test_members_with_the_same_name_are_rejected() -> None:
    ssim, _ = _members()
    with pytest.raises(RewardError, match="members share the name 'ssim'"):
        CompositeReward([Member(ssim, 1.0, "manifest"), Member(ssim, 1.0, "manifest")], name="mix")


def test_composite_manifest_loads_its_members(tmp_path: Path) -> None:
    write_reference(tmp_path / "a", metric="ssim")
    write_reference(tmp_path / "b", metric="mse")
    (tmp_path / "a" / "reference.yaml").rename(tmp_path / "a" / "ssim.yaml")
    (tmp_path / "b" / "reference.yaml").rename(tmp_path / "b" / "mse.yaml")
    manifest = tmp_path / "mix.yaml"
    manifest.write_text(
        "reward: composite\ncombine: arithmetic\nmembers:\n  - {manifest: a/ssim.yaml, weight: 2}\n  - {manifest: b/mse.yaml}\n"
    )
    reward = load_reward(manifest)
    assert isinstance(reward, CompositeReward) and reward.name == "mix"
    result = reward.score([tiny_image(0)], [""], keys=["item0-s1"])
    assert [c.name for c in result.components] == ["ssim", "mse"]
    assert result.scores[0] == pytest.approx((2 * 1.0 + 0.0) / 3)


def test_nested_composite_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "inner.yaml").write_text("reward: composite\nmembers: [{manifest: x.yaml}]\n")
    (tmp_path / "outer.yaml").write_text("reward: composite\nmembers: [{manifest: inner.yaml}]\n")
    with pytest.raises(RewardError, match="members.0: .*inner.yaml is itself a composite"):
        load_reward(tmp_path / "outer.yaml")


def test_single_reward_applies_its_affine_normalisation() -> None:
    reward = Reward(
        ReferenceReward.from_images({"k": tiny_image(0)}, metric="ssim"),
        normalize=AffineNormalize(kind="affine", scale=2.0, offset=0.5),
    )
    result = reward.score([tiny_image(0)], [""], keys=["k"])
    assert result.components[0].raw[0] == pytest.approx(1.0)
    assert result.scores[0] == pytest.approx(0.25)
    assert result.mean() == pytest.approx(0.25)


def test_reward_scores_in_batches_of_batch_size() -> None:
    calls: list[int] = []

    class Counting:
        name = "count"

        def score(self, images, prompts, *, keys=None):  # type: ignore[no-untyped-def]
            calls.append(len(images))
            return [float(len(p)) for p in prompts]

    result = Reward(Counting(), batch_size=2).score([tiny_image(0)] * 5, ["a", "bb", "ccc", "d", "ee"])
    assert calls == [2, 2, 1]
    assert result.scores == (1.0, 2.0, 3.0, 1.0, 2.0)


def test_non_finite_raw_score_is_an_error() -> None:
    class Broken:
        name = "broken"

        def score(self, images, prompts, *, keys=None):  # type: ignore[no-untyped-def]
            return [float("nan")] * len(images)

    with pytest.raises(RewardError, match=r"reward 'broken' gave a non-finite score \(nan\) for image 0"):
        Reward(Broken()).score([tiny_image(0)], [""])
