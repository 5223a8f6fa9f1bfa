"""Reward manifests: one-line ConfigErrors naming the file and field, paths relative to the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from automerge.errors import ConfigError
from automerge.rewards import CompositeManifest, RewardManifest, read_manifest
from automerge.rewards.manifest import AffineNormalize

IMAGEREWARD = """\
reward: imagereward
weights: {model: w/ImageReward.pt, vocab: w/vocab.txt}
"""


def _write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_weight_paths_resolve_relative_to_the_manifest(tmp_path: Path) -> None:
    manifest = read_manifest(_write(tmp_path, IMAGEREWARD))
    assert isinstance(manifest, RewardManifest)
    assert manifest.weights["model"] == tmp_path / "w" / "ImageReward.pt"
    assert manifest.display_name(tmp_path / "r.yaml") == "r"


def test_home_relative_weight_paths_expand(tmp_path: Path) -> None:
    manifest = read_manifest(
        _write(tmp_path, "reward: imagereward\nweights: {model: ~/x.pt, vocab: v.txt}\n")
    )
    assert isinstance(manifest, RewardManifest)
    assert manifest.weights["model"] == Path.home() / "x.pt"


def test_unknown_plugin_suggests_the_closest_name(tmp_path: Path) -> None:
    path = _write(tmp_path, "reward: imagerewad\n")
    with pytest.raises(
        ConfigError,
        match=r"r\.yaml: field 'reward': unknown reward model 'imagerewad' \(did you mean 'imagereward'\?\)",
    ):
        read_manifest(path)


def test_misspelled_top_level_key_suggests_the_field(tmp_path: Path) -> None:
    path = _write(tmp_path, IMAGEREWARD + "normalise: {kind: none}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'normalise' \(did you mean 'normalize'\?\)"):
        read_manifest(path)


def test_unknown_weight_role_suggests_the_role(tmp_path: Path) -> None:
    path = _write(tmp_path, "reward: imagereward\nweights: {modle: a.pt, vocab: v.txt}\n")
    with pytest.raises(
        ConfigError,
        match=r"field 'weights': reward 'imagereward' has no weight role 'modle' \(did you mean 'model'\?\)",
    ):
        read_manifest(path)


def test_missing_required_weight_role_raises(tmp_path: Path) -> None:
    path = _write(tmp_path, "reward: imagereward\nweights: {model: a.pt}\n")
    with pytest.raises(ConfigError, match="role 'vocab' is required by reward 'imagereward'"):
        read_manifest(path)


def test_malformed_sha256_raises(tmp_path: Path) -> None:
    path = _write(tmp_path, IMAGEREWARD + "sha256: {model: abc}\n")
    with pytest.raises(
        ConfigError, match="field 'sha256': sha256 of 'model' must be 64 lowercase hex digits"
    ):
        read_manifest(path)


def test_unquoted_numeric_sha256_says_to_quote_it(tmp_path: Path) -> None:
    path = _write(tmp_path, IMAGEREWARD + f"sha256: {{model: {'1' * 64}}}\n")
    with pytest.raises(ConfigError, match="must be a quoted string"):
        read_manifest(path)


def test_sha256_for_an_unknown_role_raises(tmp_path: Path) -> None:
    path = _write(tmp_path, IMAGEREWARD + f"sha256: {{modl: '{'0' * 64}'}}\n")
    with pytest.raises(ConfigError, match=r"'modl' names no role under weights \(did you mean 'model'\?\)"):
        read_manifest(path)


def test_sha256_inside_a_file_role_raises(tmp_path: Path) -> None:
    path = _write(tmp_path, IMAGEREWARD + f"sha256: {{model/x.bin: '{'0' * 64}'}}\n")
    with pytest.raises(ConfigError, match="only sha256 may name a file inside a folder role"):
        read_manifest(path)


def test_misspelled_plugin_option_names_the_options_section(tmp_path: Path) -> None:
    path = _write(tmp_path, "reward: reference\noptions: {metrc: ssim}\n")
    with pytest.raises(
        ConfigError, match=r"r\.yaml: options: unknown key 'metrc' \(did you mean 'metric'\?\)"
    ):
        read_manifest(path)


def test_invalid_plugin_option_value_raises(tmp_path: Path) -> None:
    path = _write(tmp_path, "reward: reference\noptions: {metric: psnr}\n")
    with pytest.raises(ConfigError, match="options: field 'metric'.*found 'psnr'"):
        read_manifest(path)


def test_zero_affine_scale_raises(tmp_path: Path) -> None:
    path = _write(tmp_path, IMAGEREWARD + "normalize: {kind: affine, scale: 0}\n")
    with pytest.raises(ConfigError, match="scale must be a finite number other than 0"):
        read_manifest(path)


def test_affine_normalize_subtracts_offset_then_divides_by_scale(tmp_path: Path) -> None:
    manifest = read_manifest(
        _write(tmp_path, IMAGEREWARD + "normalize: {kind: affine, scale: 2, offset: 5}\n")
    )
    assert isinstance(manifest, RewardManifest) and isinstance(manifest.normalize, AffineNormalize)
    assert manifest.normalize.apply(9.0) == 2.0


def test_invalid_device_raises(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="field 'device': 'gpu0' is not a torch device"):
        read_manifest(_write(tmp_path, IMAGEREWARD + "device: gpu0\n"))


def test_hub_file_outside_the_repository_raises(tmp_path: Path) -> None:
    path = _write(tmp_path, IMAGEREWARD + "hub: {model: {repo: a/b, files: [../x.pt]}}\n")
    with pytest.raises(ConfigError, match="must be a relative path inside the repository"):
        read_manifest(path)


def test_composite_manifest_resolves_member_paths(tmp_path: Path) -> None:
    text = "reward: composite\ncombine: geometric\nmembers:\n  - {manifest: a.yaml, weight: 2}\n  - {manifest: b.yaml, normalize: zscore}\n"
    manifest = read_manifest(_write(tmp_path, text))
    assert isinstance(manifest, CompositeManifest)
    assert [m.manifest for m in manifest.members] == [tmp_path / "a.yaml", tmp_path / "b.yaml"]
    assert manifest.members[0].weight == 2.0 and manifest.members[1].normalize == "zscore"


def test_composite_member_weight_must_be_positive(tmp_path: Path) -> None:
    text = "reward: composite\nmembers:\n  - {manifest: a.yaml, weight: 0}\n"
    with pytest.raises(ConfigError, match="members.0.weight"):
        read_manifest(_write(tmp_path, text))


@pytest.mark.parametrize(
    "name", ["imagereward", "laion-aesthetic", "clip-score", "pickscore", "aesthetic-v25"]
)
def test_shipped_manifests_parse(name: str) -> None:
    path = Path(__file__).resolve().parents[2] / "rewards" / f"{name}.yaml"
    manifest = read_manifest(path)
    assert isinstance(manifest, RewardManifest) and manifest.reward == name
    assert manifest.hub and all(
        str(p).startswith(str(Path.home() / ".cache/automerge/rewards")) for p in manifest.weights.values()
    )


def test_loading_a_reward_model_prints_no_progress_bars(tiny_manifests: dict[str, Path], capfd) -> None:
    """transformers drew "Loading weights" bars in the middle of a study's status lines."""
    from automerge.rewards import load_reward

    for manifest in tiny_manifests.values():
        load_reward(manifest, device="cpu")
    printed = capfd.readouterr()
    assert "Loading weights" not in printed.err + printed.out
