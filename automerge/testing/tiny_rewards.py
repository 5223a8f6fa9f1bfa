"""Random reward models with the real architectures and file layouts, written to a folder with a
manifest: tiny ones for tests and the contract suite (CPU, seconds), and ImageReward and the LAION
aesthetic predictor at their published sizes for the benchmarks (random weights: the same work as the
real ones, nothing downloaded).

Each ``write_tiny_*`` / ``write_random_*`` returns the manifest path; ``TINY_REWARDS`` maps every
built-in plug-in name to its tiny writer (the contract suite fails for a plug-in registered without one).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image

from automerge.rewards.heads import ScoreHead
from automerge.rewards.imagereward import (
    BlipVisionSizes,
    ImageRewardNet,
    read_med_config,
    to_official_imagereward_state_dict,
)

TINY_VISION = BlipVisionSizes(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    patch_size=16,
    image_size=32,
)
BERT_WORDS = (
    "a",
    "photo",
    "of",
    "cat",
    "dog",
    "red",
    "blue",
    "house",
    "tree",
    "the",
    "in",
    "on",
    "##s",
    "##ing",
)


@dataclass(frozen=True)
class BertSizes:
    """The sizes of ImageReward's text encoder (a BERT with cross-attention), as ``med_config.json``
    gives them; ``vocab_words``: tokens in ``vocab.txt`` (None: the 19-token test vocabulary)."""

    hidden_size: int = 32
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 64
    max_positions: int = 40
    vocab_words: int | None = None


TINY_BERT = BertSizes()
BERT_BASE = BertSizes(
    hidden_size=768, layers=12, heads=12, intermediate_size=3072, max_positions=512, vocab_words=30522
)
"""ImageReward's published text encoder: bert-base-uncased (30,522 tokens; ImageReward adds two)."""

_IMAGEREWARD_FILES = {"model": "ImageReward.pt", "med_config": "med_config.json", "vocab": "vocab.txt"}
_IMAGEREWARD_HUB = {
    "model": {"repo": "THUDM/ImageReward", "files": ["ImageReward.pt"]},
    "med_config": {"repo": "THUDM/ImageReward", "files": ["med_config.json"]},
    "vocab": {"repo": "google-bert/bert-base-uncased", "files": ["vocab.txt"]},
}


@contextmanager
def _seeded(seed: int, device: str = "cpu") -> Iterator[None]:
    """Seed torch's global generators (the CPU's and ``device``'s) inside the block only, new tensors
    made on ``device`` (random init of library classes)."""
    where = torch.device(device)
    cuda = [where.index or 0] if where.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), where:
        torch.manual_seed(seed)
        yield


def _write_manifest(path: Path, data: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(dict(data), sort_keys=False), encoding="utf-8")
    return path


def write_bert_vocab(path: Path, words: tuple[str, ...] = BERT_WORDS) -> Path:
    """A BERT ``vocab.txt``: the special tokens then ``words``, one per line."""
    path.write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n", encoding="utf-8"
    )
    return path


def tiny_med_config(*, vocab_size: int, hidden_size: int = 32, layers: int = 2) -> dict[str, Any]:
    """A BERT ``med_config.json`` as ImageReward ships it, at tiny sizes."""
    return {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": 2 * hidden_size,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 40,
        "model_type": "bert",
        "num_attention_heads": 4,
        "num_hidden_layers": layers,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": vocab_size,
        "encoder_width": hidden_size,
        "add_cross_attention": True,
    }


def official_imagereward_checkpoint(net: ImageRewardNet, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """``net``'s weights in the official ``ImageReward.pt`` layout, including the keys the official
    file carries but scoring never reads (BLIP's contrastive projections, BERT position ids)."""
    state = to_official_imagereward_state_dict(net.state_dict())
    generator = torch.Generator().manual_seed(seed)
    vision_width = net.vision.config.hidden_size
    text_width = net.text.config.hidden_size
    state["blip.vision_proj.weight"] = torch.randn(256, vision_width, generator=generator)
    state["blip.vision_proj.bias"] = torch.zeros(256)
    state["blip.text_proj.weight"] = torch.randn(256, text_width, generator=generator)
    state["blip.text_proj.bias"] = torch.zeros(256)
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(
        net.text.config.max_position_embeddings
    )[None]
    return state


def write_tiny_imagereward(folder: Path, *, seed: int = 0, vision: BlipVisionSizes = TINY_VISION) -> Path:
    """ImageReward.pt (official layout), med_config.json, vocab.txt and ``imagereward.yaml`` (with the
    hub files a real ImageReward is fetched from)."""
    return write_random_imagereward(folder, text=TINY_BERT, vision=vision, seed=seed, hub=True)


def write_random_imagereward(
    folder: Path,
    *,
    text: BertSizes = BERT_BASE,
    vision: BlipVisionSizes = BlipVisionSizes(),
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    hub: bool = False,
) -> Path:
    """An ImageReward with random weights (default: the published sizes, BLIP ViT-L/16 at 224 px and
    BERT-base, 447 M parameters), initialised on ``device`` and saved in ``dtype`` on the CPU:
    ``ImageReward.pt`` (official key layout), ``med_config.json``, ``vocab.txt`` and ``imagereward.yaml``."""
    folder.mkdir(parents=True, exist_ok=True)
    words = BERT_WORDS
    if text.vocab_words is not None:  # padded with made-up words to the vocabulary's real length
        words += tuple(f"w{i}" for i in range(text.vocab_words - 5 - len(BERT_WORDS)))
    vocab = write_bert_vocab(folder / "vocab.txt", words)
    vocab_size = len(vocab.read_text(encoding="utf-8").splitlines()) + 2  # + [DEC], [ENC]
    med = tiny_med_config(vocab_size=vocab_size, hidden_size=text.hidden_size, layers=text.layers)
    med.update(
        num_attention_heads=text.heads,
        intermediate_size=text.intermediate_size,
        max_position_embeddings=text.max_positions,
        encoder_width=vision.hidden_size,
    )
    med_path = folder / "med_config.json"
    med_path.write_text(json.dumps(med, indent=2), encoding="utf-8")
    vision_config = vision.config()
    with _seeded(seed, device):
        net = ImageRewardNet(
            vision_config, read_med_config(med_path).config(encoder_hidden_size=vision.hidden_size)
        )
    state = official_imagereward_checkpoint(net, seed=seed)
    torch.save(_stored(state, dtype), folder / "ImageReward.pt")
    manifest: dict[str, Any] = {"reward": "imagereward", "weights": dict(_IMAGEREWARD_FILES)}
    if hub:
        manifest["hub"] = _IMAGEREWARD_HUB
    manifest["options"] = {"vision": vision.model_dump()}
    return _write_manifest(folder / "imagereward.yaml", manifest)


def _stored(state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """CPU tensors, floating ones in ``dtype`` (as the published fp16 checkpoints)."""
    return {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu() for k, v in state.items()}


def tiny_clip_vocab() -> dict[str, int]:
    """A character-level CLIP BPE vocabulary (no merges needed): specials, a–z, a–z + ``</w>``."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    return vocab


def _tiny_clip_config() -> Any:
    from transformers import CLIPConfig

    vocab = tiny_clip_vocab()
    text = {
        "vocab_size": len(vocab),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "bos_token_id": vocab["<|startoftext|>"],
        "eos_token_id": vocab["<|endoftext|>"],
        "pad_token_id": vocab["<|endoftext|>"],
        "projection_dim": 16,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
        "projection_dim": 16,  # as real checkpoints: CLIPVisionModelWithProjection reads it from here
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def _clip_vit_l14_config() -> Any:
    """openai/clip-vit-large-patch14: ViT-L/14 at 224 px, 12-layer 768-wide text tower, 768-d projection."""
    from transformers import CLIPConfig

    text = {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
        "projection_dim": 768,
    }
    vision = {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 14,
        "projection_dim": 768,
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)


def write_tiny_clip_folder(folder: Path, *, seed: int = 0, processor: bool = True) -> Path:
    """A transformers CLIP folder: config.json + model.safetensors, and with ``processor`` the
    tokenizer and image processor files."""
    from transformers import CLIPModel

    with _seeded(seed):
        model = CLIPModel(_tiny_clip_config())
    model.save_pretrained(folder)
    if processor:
        write_tiny_clip_processor(folder)
    return folder


def write_tiny_clip_processor(folder: Path) -> Path:
    """CLIP tokenizer (character BPE) and image processor (32 px) files."""
    from transformers import CLIPTokenizer

    from automerge.rewards.pretrained import image_processor_class

    CLIPTokenizer(vocab=tiny_clip_vocab(), merges=[], model_max_length=77).save_pretrained(folder)
    image_processor = image_processor_class("CLIP")(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    image_processor.save_pretrained(folder)
    return folder


def write_tiny_clip_score(folder: Path, *, seed: int = 0, reward: str = "clip-score") -> Path:
    """A tiny CLIP folder and ``<reward>.yaml``; for pickscore the processor lives in its own folder."""
    folder.mkdir(parents=True, exist_ok=True)
    separate = reward == "pickscore"
    write_tiny_clip_folder(folder / "model", seed=seed, processor=not separate)
    weights = {"model": "model"}
    if separate:
        write_tiny_clip_processor(folder / "processor")
        weights["processor"] = "processor"
    return _write_manifest(folder / f"{reward}.yaml", {"reward": reward, "weights": weights})


def write_tiny_laion_aesthetic(folder: Path, *, seed: int = 0) -> Path:
    """A full tiny CLIP folder (text tower unused), a random ``layers.N`` head .pth, the manifest."""
    return _write_laion_aesthetic(folder, _tiny_clip_config(), seed=seed, device="cpu", dtype=torch.float32)


def write_random_laion_aesthetic(
    folder: Path, *, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> Path:
    """The LAION aesthetic predictor v2 at its published size with random weights: a full CLIP
    ViT-L/14 folder (initialised on ``device``, saved in ``dtype``), a random 768-wide head, the manifest."""
    return _write_laion_aesthetic(folder, _clip_vit_l14_config(), seed=seed, device=device, dtype=dtype)


def _write_laion_aesthetic(folder: Path, config: Any, *, seed: int, device: str, dtype: torch.dtype) -> Path:
    from transformers import CLIPModel

    folder.mkdir(parents=True, exist_ok=True)
    with _seeded(seed, device):
        model = CLIPModel(config)
    model.to(dtype).save_pretrained(folder / "clip")
    with _seeded(seed + 1):
        head = ScoreHead(config.projection_dim)
    torch.save(head.state_dict(), folder / "head.pth")
    return _write_manifest(
        folder / "laion-aesthetic.yaml",
        {"reward": "laion-aesthetic", "weights": {"clip": "clip", "head": "head.pth"}},
    )


def write_tiny_aesthetic_v25(folder: Path, *, seed: int = 0) -> Path:
    """A full tiny SigLIP folder with its image processor, a random ``scoring_head.N`` head .pth."""
    from transformers import SiglipConfig, SiglipModel

    from automerge.rewards.aesthetic import _V25Head
    from automerge.rewards.pretrained import image_processor_class

    folder.mkdir(parents=True, exist_ok=True)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = SiglipConfig(
        text_config={
            **small,
            "vocab_size": 64,
            "max_position_embeddings": 16,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={**small, "image_size": 32, "patch_size": 8},
    )
    with _seeded(seed):
        SiglipModel(config).save_pretrained(folder / "siglip")
        head = _V25Head(32)
    image_processor_class("Siglip")(size={"height": 32, "width": 32}).save_pretrained(folder / "siglip")
    torch.save(head.state_dict(), folder / "head.pth")
    return _write_manifest(
        folder / "aesthetic-v25.yaml",
        {"reward": "aesthetic-v25", "weights": {"siglip": "siglip", "head": "head.pth"}},
    )


def tiny_image(seed: int, *, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """A deterministic random RGB image."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), mode="RGB")


def write_reference(
    folder: Path, *, keys: tuple[str, ...] = ("item0-s1", "item1-s2"), metric: str = "ssim"
) -> Path:
    """``refs/<key>.png`` (``tiny_image`` of each key's index) and ``reference.yaml``."""
    refs = folder / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    for index, key in enumerate(keys):
        tiny_image(index).save(refs / f"{key}.png")
    return _write_manifest(
        folder / "reference.yaml", {"reward": "reference", "options": {"metric": metric, "directory": "refs"}}
    )


TINY_REWARDS: Mapping[str, Callable[[Path], Path]] = {
    "imagereward": write_tiny_imagereward,
    "clip-score": write_tiny_clip_score,
    "pickscore": lambda folder: write_tiny_clip_score(folder, reward="pickscore"),
    "laion-aesthetic": write_tiny_laion_aesthetic,
    "aesthetic-v25": write_tiny_aesthetic_v25,
    "reference": write_reference,
}
