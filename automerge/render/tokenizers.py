"""CLIP tokenizers built with no hub: from a local folder, or from the CLIP BPE vocabulary we vendor.

SD1, SD2 and SDXL text encoders all use OpenAI CLIP's byte-level BPE (49,408 tokens, 77 positions).
``data/bpe_simple_vocab_16e6.txt.gz`` is that vocabulary as open_clip ships it (MIT, see
``data/LICENSE-open_clip.txt``); it is converted to a vocabulary and merge list exactly as open_clip's
``SimpleTokenizer`` builds them, so token ids equal open_clip's (text cleaning aside: like the diffusers
pipelines, no ftfy / HTML unescaping). The only difference between the families' tokenizers is the
padding token: ``<|endoftext|>`` (49407) for CLIP ViT-L, ``!`` (0) for OpenCLIP encoders (SD2, SDXL's
second), as in the official diffusers repositories.
"""

from __future__ import annotations

import gzip
from pathlib import Path

from transformers import CLIPTokenizer

from automerge.errors import ConfigError

VENDORED_BPE = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
CONTEXT_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
PAD_EOS, PAD_ZERO = EOS, "!"
_MERGE_COUNT = 49152 - 256 - 2  # open_clip: merges = lines[1 : 49152 - 256 - 2 + 1]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable character table, in open_clip's insertion order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {byte: chr(byte) for byte in printable}
    others = [byte for byte in range(256) if byte not in table]
    table.update({byte: chr(256 + n) for n, byte in enumerate(others)})
    return table


def read_clip_bpe(path: Path = VENDORED_BPE) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges from an open_clip ``bpe_simple_vocab_16e6.txt.gz``.

    vocab = 256 byte symbols + the same with ``</w>`` + one token per merge + BOS, EOS (49,408 ids).
    """
    try:
        lines = gzip.decompress(Path(path).read_bytes()).decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not a readable CLIP BPE vocabulary ({error})") from None
    merges = [_merge_pair(line, path) for line in lines[1 : _MERGE_COUNT + 1]]
    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), BOS, EOS]
    return {token: index for index, token in enumerate(tokens)}, merges


def _merge_pair(line: str, path: Path) -> tuple[str, str]:
    parts = line.split()
    if len(parts) != 2:
        raise ConfigError(f"{path}: malformed merge line {line!r}; expected two symbols")
    return parts[0], parts[1]


def clip_tokenizer(*, pad_token: str = PAD_EOS, bpe_path: Path = VENDORED_BPE) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` from the open_clip BPE file (77 positions, ``pad_token`` for padding).

    Built from ``vocab=``/``merges=``: in transformers 5, ``vocab_file=`` is silently ignored and yields
    a 3-token vocabulary.
    """
    vocab, merges = read_clip_bpe(bpe_path)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CONTEXT_LENGTH, pad_token=pad_token)


def load_tokenizer_folder(folder: Path) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` saved in ``folder`` (``tokenizer.json`` or ``vocab.json`` + ``merges.txt``)."""
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
        raise ConfigError(
            f"{folder}: no tokenizer.json or vocab.json + merges.txt; point tokenizer_dir at a diffusers "
            "model folder (with tokenizer/, and tokenizer_2/ for SDXL) or leave it unset"
        )
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{folder}: cannot load the CLIP tokenizer ({error})") from None
    # Folders holding only vocab.json + merges.txt have no max length: CLIP always has 77 positions.
    tokenizer.model_max_length = CONTEXT_LENGTH
    return tokenizer


class TokenizerCache:
    """Built tokenizers by (folder, pad token): hold one per process so each is built only once."""

    def __init__(self) -> None:
        self._built: dict[tuple[Path | None, str], CLIPTokenizer] = {}

    def get(self, *, folder: Path | None, pad_token: str) -> CLIPTokenizer:
        """The tokenizer saved in ``folder`` (its own padding), else the vendored one with ``pad_token``."""
        key = (folder, pad_token)
        if key not in self._built:
            self._built[key] = (
                clip_tokenizer(pad_token=pad_token) if folder is None else load_tokenizer_folder(folder)
            )
        return self._built[key]
