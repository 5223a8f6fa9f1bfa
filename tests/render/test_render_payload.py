"""Payload files: defaults, seeds, jobs, wildcards, validation errors, the shipped payload sets."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from automerge.errors import ConfigError
from automerge.render.payload import RenderJob, expand_wildcards, job_key, load_payload

REPO = Path(__file__).resolve().parents[2]
PAYLOADS = REPO / "payloads"

EXAMPLE = """\
defaults: {steps: 20, cfg: 6.0, width: 512, height: 512, scheduler: euler, seeds: [1, 2]}
items:
  - {prompt: "a lighthouse on a cliff at dusk, oil painting", weight: 1.0}
  - {prompt: "portrait of an old fisherman, photo", negative_prompt: "blurry", seeds: 4}
"""


def write(folder: Path, text: str, name: str = "payload.yaml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def test_example_payload_gives_one_job_per_item_and_seed(tmp_path: Path) -> None:
    jobs = load_payload(write(tmp_path, EXAMPLE)).jobs()

    assert [job.key for job in jobs] == [
        "i00-s0001",
        "i00-s0002",
        "i01-s0000",
        "i01-s0001",
        "i01-s0002",
        "i01-s0003",
    ]
    assert jobs[0] == RenderJob(
        key="i00-s0001",
        item=0,
        seed=1,
        prompt="a lighthouse on a cliff at dusk, oil painting",
        negative_prompt="",
        steps=20,
        cfg=6.0,
        width=512,
        height=512,
        scheduler="euler",
        clip_skip=1,
        weight=0.5,
    )
    assert {job.negative_prompt for job in jobs[2:]} == {"blurry"}


def test_item_weight_is_shared_by_its_seeds(tmp_path: Path) -> None:
    jobs = load_payload(write(tmp_path, EXAMPLE)).jobs()

    per_item = [sum(job.weight for job in jobs if job.item == item) for item in (0, 1)]
    assert per_item == pytest.approx([1.0, 1.0])
    assert [job.weight for job in jobs if job.item == 1] == [0.25] * 4


def test_item_values_override_defaults_and_fallbacks_fill_the_rest(tmp_path: Path) -> None:
    text = """\
defaults: {steps: 20, width: 512, height: 768, seeds: 1, cfg: 5.5}
items:
  - {prompt: a, steps: 30, scheduler: ddim, clip_skip: 2, width: 640}
  - {prompt: b}
"""
    first, second = load_payload(write(tmp_path, text)).items

    assert (first.steps, first.width, first.height, first.scheduler, first.clip_skip) == (
        30,
        640,
        768,
        "ddim",
        2,
    )
    assert (second.steps, second.cfg, second.scheduler, second.clip_skip) == (20, 5.5, "euler", 1)
    assert second.negative_prompt == "" and second.weight == 1.0 and second.seeds == (0,)


def test_job_keys_are_unique_and_file_name_safe(tmp_path: Path) -> None:
    text = "defaults: {steps: 4, width: 64, height: 64}\nitems:\n" + "".join(
        f"  - {{prompt: p{i}, seeds: [0, 7, 123456789]}}\n" for i in range(12)
    )
    keys = [job.key for job in load_payload(write(tmp_path, text)).jobs()]

    assert len(set(keys)) == len(keys) == 36
    assert all(re.fullmatch(r"i\d{2,}-s\d{4,}", key) for key in keys)
    assert job_key(11, 123456789) == "i11-s123456789"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("items: []", r"field 'items': the item list is empty"),
        ("items:\n  - {prompt: '   '}", r"field 'items\.0\.prompt': the prompt is empty"),
        ("items:\n  - {prompt: a, seeds: 0}", r"field 'items\.0\.seeds': a seed count must be in \[1, "),
        ("items:\n  - {prompt: a, seeds: []}", r"field 'items\.0\.seeds': the seed list is empty"),
        ("items:\n  - {prompt: a, seeds: [3, 3]}", r"field 'items\.0\.seeds': seeds must be distinct"),
        ("items:\n  - {prompt: a, seeds: [-1]}", r"field 'items\.0\.seeds': every seed must be in \[0, "),
        (
            "items:\n  - {prompt: a, width: 500}",
            r"field 'items\.0\.width': must be a multiple of 8 \(try 496\)",
        ),
        (
            "items:\n  - {prompt: a, height: 32}",
            r"field 'items\.0\.height': the size in pixels must be in \[64, 4096\]",
        ),
        ("defaults: {width: 8192}\nitems:\n  - {prompt: a}", r"field 'defaults\.width': the size in pixels"),
        (
            "items:\n  - {prompt: a, steps: 0}",
            r"field 'items\.0\.steps': steps must be in \[1, 200\]; found 0",
        ),
        (
            "items:\n  - {prompt: a, steps: 500}",
            r"field 'items\.0\.steps': steps must be in \[1, 200\]; found 500",
        ),
        (
            "items:\n  - {prompt: a, cfg: -1}",
            r"field 'items\.0\.cfg': must be a finite number >= 0; found -1",
        ),
        ("items:\n  - {prompt: a, weight: -0.5}", r"field 'items\.0\.weight': must be a finite number >= 0"),
        (
            "items:\n  - {prompt: a, clip_skip: 0}",
            r"field 'items\.0\.clip_skip': clip_skip must be in \[1, 12\]",
        ),
        (
            "items:\n  - {prompt: a, scheduler: eulr}",
            r"unknown scheduler \(did you mean 'euler'\?\); known: .*euler_a",
        ),
        ("items:\n  - {prompt: a, step: 3}", r"unknown key 'items\.0\.step'"),
        (
            "defaults: {step: 3}\nitems:\n  - {prompt: a}",
            r"unknown key 'defaults\.step' \(did you mean 'steps'\?\)",
        ),
        ("items:\n  - {negative_prompt: a}", r"field 'items\.0\.prompt' is required"),
        ("defaults: {prompt: a}\nitems:\n  - {prompt: a}", r"unknown key 'defaults\.prompt'"),
    ],
)
def test_invalid_payload_is_one_line_config_error_naming_file_and_field(
    tmp_path: Path, body: str, message: str
) -> None:
    defaults = (
        ""
        if body.startswith(("defaults", "items: []"))
        else "defaults: {steps: 4, width: 64, height: 64, seeds: 1}\n"
    )
    path = write(tmp_path, defaults + body)

    with pytest.raises(ConfigError, match=message) as caught:
        load_payload(path)
    assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)


def test_setting_given_neither_on_item_nor_in_defaults_is_required(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "defaults: {width: 64, height: 64, seeds: 1}\nitems:\n  - {prompt: a}\n  - {prompt: b, steps: 3}",
    )

    with pytest.raises(
        ConfigError, match=r"field 'items\.0\.steps' is required: set it on the item or under defaults"
    ):
        load_payload(path)


def test_all_zero_weights_are_rejected(tmp_path: Path) -> None:
    path = write(
        tmp_path, "defaults: {steps: 4, width: 64, height: 64, seeds: 1, weight: 0}\nitems:\n  - {prompt: a}"
    )

    with pytest.raises(ConfigError, match="every item has weight 0"):
        load_payload(path)


def test_missing_payload_file_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_payload(tmp_path / "nope.yaml")


WILDCARD_PAYLOAD = """\
defaults: {steps: 4, width: 64, height: 64, seeds: 40}
items:
  - {prompt: "a __animal__ in a __animal__ costume", negative_prompt: "__bad__"}
  - {prompt: "plain prompt"}
"""


def make_wildcards(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "animal.txt").write_text("# animals\ncat\n\n  dog  \nfox\nowl\n", encoding="utf-8")
    (folder / "bad.txt").write_text("blurry\nlowres\n", encoding="utf-8")


def test_wildcards_expand_from_the_folder_beside_the_payload(tmp_path: Path) -> None:
    make_wildcards(tmp_path / "wildcards")
    jobs = load_payload(write(tmp_path, WILDCARD_PAYLOAD)).jobs()

    first_item = [job for job in jobs if job.item == 0]
    pattern = re.compile(r"a (cat|dog|fox|owl) in a (cat|dog|fox|owl) costume")
    assert all(pattern.fullmatch(job.prompt) for job in first_item)
    assert {job.negative_prompt for job in first_item} == {"blurry", "lowres"}
    assert len({job.prompt for job in first_item}) > 4  # varies with the seed
    assert any(
        pattern.fullmatch(j.prompt).group(1) != pattern.fullmatch(j.prompt).group(2) for j in first_item
    )
    assert {job.prompt for job in jobs if job.item == 1} == {"plain prompt"}


def test_wildcard_expansion_is_stable_across_loads_and_releases(tmp_path: Path) -> None:
    make_wildcards(tmp_path / "wildcards")
    path = write(tmp_path, WILDCARD_PAYLOAD)

    assert load_payload(path).jobs() == load_payload(path).jobs()
    options = {"animal": ("cat", "dog", "fox", "owl")}
    # Golden values: sha256-based choice, independent of PYTHONHASHSEED and of the platform.
    assert expand_wildcards("__animal__ __animal__", options, item=0, seed=1, part="prompt") == "owl cat"
    assert expand_wildcards("__animal__ __animal__", options, item=3, seed=7, part="prompt") == "fox fox"


def test_wildcards_key_is_relative_to_the_payload_file(tmp_path: Path) -> None:
    make_wildcards(tmp_path / "lists")
    path = write(tmp_path, "wildcards: lists\n" + WILDCARD_PAYLOAD)

    assert load_payload(path).wildcards["animal"] == ("cat", "dog", "fox", "owl")


def test_missing_wildcard_file_names_the_field_and_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, WILDCARD_PAYLOAD)

    with pytest.raises(
        ConfigError, match=r"field 'items\.0\.prompt': wildcard __animal__: file .*animal\.txt not found"
    ):
        load_payload(path)


def test_missing_wildcards_folder_is_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, "wildcards: nowhere\n" + WILDCARD_PAYLOAD)

    with pytest.raises(ConfigError, match=r"field 'wildcards': folder .*nowhere not found"):
        load_payload(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [("\n# only a comment\n", "has no options"), ("a __bad__ cat\n", "nesting is not supported")],
)
def test_unusable_wildcard_file_is_config_error(tmp_path: Path, content: str, message: str) -> None:
    make_wildcards(tmp_path / "wildcards")
    (tmp_path / "wildcards" / "animal.txt").write_text(content, encoding="utf-8")

    with pytest.raises(ConfigError, match=message):
        load_payload(write(tmp_path, WILDCARD_PAYLOAD))


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("portraits-sd1.yaml", 512),
        ("landscapes-sd1.yaml", 512),
        ("portraits-sdxl.yaml", 1024),
        ("landscapes-sdxl.yaml", 1024),
    ],
)
def test_shipped_payload_sets_are_valid_and_varied(name: str, size: int) -> None:
    payload = load_payload(PAYLOADS / name)

    assert 6 <= len(payload.items) <= 10
    assert len({item.prompt for item in payload.items}) == len(payload.items)
    assert all(item.negative_prompt for item in payload.items)
    assert {(item.width, item.height) for item in payload.items} == {(size, size)}


def test_tiny_demo_payload_is_small_and_fast() -> None:
    payload = load_payload(PAYLOADS / "tiny.yaml")

    assert 3 <= len(payload.items) <= 4
    assert all((i.width, i.height, i.scheduler, len(i.seeds)) == (64, 64, "euler", 2) for i in payload.items)
    assert all(4 <= item.steps <= 6 and 4 <= item.cfg <= 6 for item in payload.items)


def test_loading_a_payload_does_not_import_diffusers() -> None:
    code = (
        "import sys; from automerge.render import load_payload; "
        f"load_payload({str(PAYLOADS / 'tiny.yaml')!r}); "
        "assert 'diffusers' not in sys.modules and 'torch' not in sys.modules, 'heavy import'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


FIDELITIES = EXAMPLE + "fidelities:\n  - {steps: 4, seeds: 1}\n  - {steps: 10}\n"


def test_fidelities_are_cheaper_previews_of_the_same_items(tmp_path: Path) -> None:
    payload = load_payload(write(tmp_path, FIDELITIES))
    assert len(payload.fidelities) == 2
    cheapest = payload.jobs(fidelity=0)
    assert [(job.key, job.steps) for job in cheapest] == [("i00-s0001", 4), ("i01-s0000", 4)]
    assert [job.weight for job in cheapest] == [1.0, 1.0]  # the item's whole weight on its one seed
    middle = payload.jobs(fidelity=1)
    assert [job.key for job in middle] == [job.key for job in payload.jobs()]
    assert {job.steps for job in middle} == {10}
    assert payload.jobs() == payload.jobs(fidelity=None)  # the full payload


@pytest.mark.parametrize(
    ("fidelity", "message"),
    [
        ("{steps: 0}", "fidelities.0.steps"),
        ("{seeds: 0}", "fidelities.0.seeds"),
        ("{stepz: 2}", "unknown key 'fidelities.0.stepz' (did you mean 'steps'?)"),
        ("{}", "field 'fidelities.0': a fidelity changes steps or seeds"),
    ],
)
def test_a_bad_fidelity_names_its_field(tmp_path: Path, fidelity: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_payload(write(tmp_path, EXAMPLE + f"fidelities:\n  - {fidelity}\n"))
