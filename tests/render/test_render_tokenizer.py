"""CLIP tokenizers with no hub: ids equal OpenAI/open_clip's, family padding, local folders, caching."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
from pathlib import Path

import pytest
import regex
import torch
from tiny_modules import tiny_sd1_modules, tiny_sdxl_modules

from automerge.errors import ConfigError
from automerge.render.pipeline import build_pipeline
from automerge.render.tokenizers import VENDORED_BPE, TokenizerCache, clip_tokenizer, load_tokenizer_folder


class ReferenceTokenizer:
    """A line-by-line port of open_clip's ``SimpleTokenizer`` (clean="lower", without ftfy/HTML)."""

    def __init__(self, bpe_path: Path) -> None:
        bs = (
            list(range(ord("!"), ord("~") + 1))
            + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1))
        )
        cs = bs[:]
        n = 0
        for b in range(2**8):
            if b not in bs:
                bs.append(b)
                cs.append(2**8 + n)
                n += 1
        self.byte_encoder = dict(zip(bs, [chr(c) for c in cs], strict=True))
        merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in merges[1 : 49152 - 256 - 2 + 1]]
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab]
        vocab += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = dict(zip(vocab, range(len(vocab)), strict=True))
        self.bpe_ranks = dict(zip(merges, range(len(merges)), strict=True))
        self.pat = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )

    def bpe(self, token: str) -> str:
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
        return " ".join(word)

    def encode(self, text: str) -> list[int]:
        text = " ".join(text.split()).strip().lower()
        ids: list[int] = []
        for token in regex.findall(self.pat, text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(token).split(" "))
        return ids


TEXTS = [
    "a photo of a cat",
    "A Photo Of A DOG!!",
    "portrait of an old fisherman, photo, 85mm, f/1.8 -- highly detailed",
    "naïve café in Zürich, 東京 at night 🌃",
    "it's what they'll've done; don't   stop   (masterpiece:1.2)",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "1234567890 3.14159 #hashtag @user",
]


@pytest.fixture(scope="module")
def reference() -> ReferenceTokenizer:
    return ReferenceTokenizer(VENDORED_BPE)


def test_known_ids_of_a_photo_of_a_cat() -> None:
    assert clip_tokenizer()("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_vocabulary_has_the_clip_size_and_special_ids() -> None:
    tokenizer = clip_tokenizer()

    assert len(tokenizer) == 49408
    assert tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>", "!", "dog</w>"]) == [
        49406,
        49407,
        0,
        1929,
    ]


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_open_clip_simple_tokenizer(reference: ReferenceTokenizer, text: str) -> None:
    ids = clip_tokenizer()(text).input_ids

    assert ids[0] == 49406 and ids[-1] == 49407
    assert ids[1:-1] == reference.encode(text)


def test_vendored_vocabulary_is_the_open_clip_file_with_its_licence() -> None:
    assert hashlib.md5(VENDORED_BPE.read_bytes()).hexdigest() == "933b7abbbbde62c36f02f0e6ccde464f"
    assert "MIT" in (VENDORED_BPE.parent / "LICENSE-open_clip.txt").read_text(encoding="utf-8")


def test_long_prompts_are_truncated_to_77_with_end_token() -> None:
    ids = clip_tokenizer()("word " * 200, truncation=True, max_length=77).input_ids

    assert len(ids) == 77 and ids[-1] == 49407


def test_sd1_pads_with_end_token_sd2_and_sdxl_second_tokenizer_with_exclamation() -> None:
    sd1 = build_pipeline(tiny_sd1_modules(), device="cpu", dtype=torch.float32)
    sd2 = build_pipeline(
        dataclasses.replace(tiny_sd1_modules(), family="sd2"), device="cpu", dtype=torch.float32
    )
    sdxl = build_pipeline(tiny_sdxl_modules(), device="cpu", dtype=torch.float32)

    def padded(tokenizer: object) -> list[int]:
        return tokenizer("a cat", padding="max_length", max_length=tokenizer.model_max_length).input_ids  # type: ignore[operator, attr-defined]

    assert padded(sd1.tokenizer) == [49406, 320, 2368] + [49407] * 74
    assert padded(sd2.tokenizer) == [49406, 320, 2368, 49407] + [0] * 73
    assert padded(sdxl.tokenizer) == [49406, 320, 2368] + [49407] * 74
    assert padded(sdxl.tokenizer_2) == [49406, 320, 2368, 49407] + [0] * 73


def test_tokenizer_from_a_diffusers_model_folder(tmp_path: Path) -> None:
    clip_tokenizer().save_pretrained(tmp_path / "tokenizer")
    clip_tokenizer(pad_token="!").save_pretrained(tmp_path / "tokenizer_2")

    pipeline = build_pipeline(tiny_sdxl_modules(), tokenizer_dir=tmp_path, device="cpu", dtype=torch.float32)

    assert pipeline.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (pipeline.tokenizer.pad_token_id, pipeline.tokenizer_2.pad_token_id) == (49407, 0)


def test_tokenizer_folder_with_only_vocab_and_merges_gets_77_positions(tmp_path: Path) -> None:
    tokenizer = clip_tokenizer()
    vocab = tokenizer.get_vocab()
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    lines = [" ".join(m) if isinstance(m, list) else m for m in merges]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")

    loaded = load_tokenizer_folder(tmp_path)

    assert loaded.model_max_length == 77
    assert loaded("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_sdxl_folder_without_tokenizer_2_is_config_error(tmp_path: Path) -> None:
    clip_tokenizer().save_pretrained(tmp_path / "tokenizer")

    with pytest.raises(ConfigError, match=r"has no tokenizer_2/"):
        build_pipeline(tiny_sdxl_modules(), tokenizer_dir=tmp_path, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_unusable_tokenizer_dir_is_config_error(tmp_path: Path, make: str) -> None:
    folder = tmp_path / "tok"
    if make == "empty":
        folder.mkdir()

    with pytest.raises(ConfigError, match=str(folder)):
        build_pipeline(tiny_sd1_modules(), tokenizer_dir=folder, device="cpu", dtype=torch.float32)


def test_tokenizer_cache_builds_each_tokenizer_once() -> None:
    cache = TokenizerCache()

    first = cache.get(folder=None, pad_token="<|endoftext|>")
    assert cache.get(folder=None, pad_token="<|endoftext|>") is first
    assert cache.get(folder=None, pad_token="!") is not first
    assert TokenizerCache().get(folder=None, pad_token="<|endoftext|>") is not first
