"""ImageReward (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for
Text-to-Image Generation"; THUDM/ImageReward) ported onto transformers' BLIP classes.

score = (MLP(BERT_[CLS](prompt | cross-attn ViT(image))) − 0.16717362830052426) / 1.0333394966054072

BLIP ViT-L/16 (``BlipVisionModel``) → BERT-base with cross-attention to the image in every layer
(``BlipTextModel``, ``add_pooling_layer=False``) → [CLS] hidden state → MLP 768→1024→128→64→16→1.
The official ``ImageReward.pt`` (a plain state dict) is renamed by ``remap_imagereward_state_dict``
and loaded strictly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from automerge.config import Schema
from automerge.errors import RewardError
from automerge.rewards.base import LoadRequest, RewardPlugin, WeightRole, check_batch, register_reward
from automerge.rewards.files import load_state_dict, load_strict
from automerge.rewards.heads import ScoreHead
from automerge.rewards.preprocess import clip_transform

if TYPE_CHECKING:  # transformers is imported when a model is built, keeping `import automerge` fast
    from transformers import BertTokenizer, BlipTextConfig, BlipVisionConfig

IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
MAX_LENGTH = 35  # ImageReward pads/truncates prompts to 35 BERT tokens

# Official checkpoint keys that the scoring path never reads: BLIP's contrastive projections and the
# position-id buffer that older BERT code saved. They are dropped by name, never by a catch-all.
UNUSED_KEYS = re.compile(
    r"^blip\.(vision_proj|text_proj)\.(weight|bias)$|^blip\.text_encoder\.embeddings\.position_ids$"
)

# (official pattern, port replacement), applied in order to every key: ViT (timm-style) → BlipVisionModel.
_KEY_RULES: tuple[tuple[str, str], ...] = (
    (r"^blip\.visual_encoder\.cls_token$", "vision.embeddings.class_embedding"),
    (r"^blip\.visual_encoder\.pos_embed$", "vision.embeddings.position_embedding"),
    (r"^blip\.visual_encoder\.patch_embed\.proj\.", "vision.embeddings.patch_embedding."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm(\d)\.", r"vision.encoder.layers.\1.layer_norm\2."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision.encoder.layers.\1.self_attn.qkv."),
    (
        r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\.",
        r"vision.encoder.layers.\1.self_attn.projection.",
    ),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision.encoder.layers.\1.mlp."),
    (r"^blip\.visual_encoder\.norm\.", "vision.post_layernorm."),
    (r"^blip\.text_encoder\.", "text."),
    (r"^mlp\.layers\.", "mlp.layers."),
)


# Port → official, for writing test checkpoints in the official layout (tiny models, parity runs).
_INVERSE_RULES: tuple[tuple[str, str], ...] = (
    (r"^vision\.embeddings\.class_embedding$", "blip.visual_encoder.cls_token"),
    (r"^vision\.embeddings\.position_embedding$", "blip.visual_encoder.pos_embed"),
    (r"^vision\.embeddings\.patch_embedding\.", "blip.visual_encoder.patch_embed.proj."),
    (r"^vision\.encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"blip.visual_encoder.blocks.\1.norm\2."),
    (r"^vision\.encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"blip.visual_encoder.blocks.\1.attn.qkv."),
    (
        r"^vision\.encoder\.layers\.(\d+)\.self_attn\.projection\.",
        r"blip.visual_encoder.blocks.\1.attn.proj.",
    ),
    (r"^vision\.encoder\.layers\.(\d+)\.mlp\.", r"blip.visual_encoder.blocks.\1.mlp."),
    (r"^vision\.post_layernorm\.", "blip.visual_encoder.norm."),
    (r"^text\.", "blip.text_encoder."),
    (r"^mlp\.layers\.", "mlp.layers."),
)


def remap_imagereward_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official ``ImageReward.pt`` state dict to ``ImageRewardNet``'s keys.

    Keys in ``UNUSED_KEYS`` are dropped; a key that matches no rule is an error (never dropped)."""
    remapped: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state.items():
        if UNUSED_KEYS.match(key):
            continue
        new_key = _rename(key)
        if new_key is None:
            unknown.append(key)
        else:
            remapped[new_key] = tensor
    if unknown:
        raise RewardError(
            f"ImageReward state dict has {len(unknown)} keys of no known layout (first: {unknown[0]}); "
            "is this the official ImageReward.pt?"
        )
    return remapped


def to_official_imagereward_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``remap_imagereward_state_dict`` (without the unused keys): port → official."""
    official: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        new_key = _rename(key, rules=_INVERSE_RULES)
        if new_key is None:
            raise KeyError(f"no official name for the port key {key}")
        official[new_key] = tensor
    return official


def _rename(key: str, *, rules: tuple[tuple[str, str], ...] = _KEY_RULES) -> str | None:
    for pattern, replacement in rules:
        new_key, count = re.subn(pattern, replacement, key)
        if count:
            return new_key
    return None


class ImageRewardNet(nn.Module):
    """BLIP vision + cross-attending BLIP text encoder + MLP head; ``forward`` → raw reward (B,)."""

    def __init__(self, vision: BlipVisionConfig, text: BlipTextConfig) -> None:
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__()
        self.vision = BlipVisionModel(vision)
        self.text = BlipTextModel(text, add_pooling_layer=False)
        self.mlp = ScoreHead(text.hidden_size)

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state  # (B, 1 + patches, Dv)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
        )
        features = text.last_hidden_state[:, 0, :].float()  # (B, Dt): the [CLS] state, as the reference
        return self.mlp(features)  # (B,)


class BlipVisionSizes(Schema):
    """BLIP ViT sizes; defaults are ImageReward's ViT-L/16 at 224 px."""

    hidden_size: int = Field(default=1024, ge=1)
    intermediate_size: int = Field(default=4096, ge=1)
    num_hidden_layers: int = Field(default=24, ge=1)
    num_attention_heads: int = Field(default=16, ge=1)
    patch_size: int = Field(default=16, ge=1)
    image_size: int = Field(default=224, ge=1)
    layer_norm_eps: float = Field(default=1e-6, gt=0)

    def config(self) -> BlipVisionConfig:
        from transformers import BlipVisionConfig

        return BlipVisionConfig(**self.model_dump())


class _MedConfig(BaseModel):
    """The fields of ImageReward's ``med_config.json`` (a BERT config) that size the text encoder;
    defaults are the official BERT-base values. Other BERT keys in the file are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    vocab_size: int = 30524
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    add_cross_attention: bool = True

    def config(self, *, encoder_hidden_size: int) -> BlipTextConfig:
        from transformers import BlipTextConfig

        fields = self.model_dump(exclude={"add_cross_attention"})
        # is_decoder=True builds the cross-attention layers; forward runs with is_decoder=False, i.e.
        # bidirectional self-attention, as BLIP's BertModel in "multimodal" mode.
        # bos/sep ids are unused by the encoder; None avoids out-of-vocabulary warnings at tiny sizes.
        return BlipTextConfig(
            **fields,
            encoder_hidden_size=encoder_hidden_size,
            is_decoder=True,
            bos_token_id=None,
            sep_token_id=None,
        )


def read_med_config(path: Path | None) -> _MedConfig:
    """Parse ``med_config.json`` (or the official defaults when ``path`` is None)."""
    if path is None:
        return _MedConfig()
    try:
        med = _MedConfig.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValidationError) as error:
        reason = str(error).splitlines()[0]
        raise RewardError(f"{path}: not a valid BERT med_config.json ({reason})") from None
    if not med.add_cross_attention:
        raise RewardError(f"{path}: add_cross_attention must be true for ImageReward's text encoder")
    return med


def load_bert_tokenizer(vocab: Path) -> BertTokenizer:
    """BERT-uncased WordPiece tokenizer from a local ``vocab.txt`` plus BLIP's ``[DEC]`` (bos) and
    ``[ENC]`` special tokens (ids 30522, 30523 with the bert-base-uncased vocabulary).

    The vocabulary is read here and passed as ``vocab=`` because ``BertTokenizer(vocab_file=…)``
    silently builds a 5-token vocabulary in transformers 5."""
    from transformers import BertTokenizer

    try:
        lines = vocab.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as error:
        raise RewardError(f"{vocab}: cannot be read as a BERT vocab.txt ({error})") from None
    tokens = lines[:-1] if lines and lines[-1] == "" else lines
    table = {token.rstrip("\r"): index for index, token in enumerate(tokens)}
    missing = [token for token in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if token not in table]
    if missing:
        raise RewardError(f"{vocab}: not a BERT vocabulary (no {', '.join(missing)} token)")
    tokenizer = BertTokenizer(vocab=table, do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageRewardOptions(Schema):
    """``vision``: BLIP ViT sizes (defaults: the official ViT-L/16)."""

    vision: BlipVisionSizes = Field(default_factory=BlipVisionSizes)


@register_reward("imagereward")
class ImageReward(RewardPlugin):
    """ImageReward-v1.0: human-preference reward for a (prompt, image) pair; ≈ N(0, 1) on its data."""

    weight_roles: ClassVar[tuple[WeightRole, ...]] = (
        WeightRole("model", "file", "ImageReward.pt, the official state dict"),
        WeightRole("vocab", "file", "vocab.txt of bert-base-uncased"),
        WeightRole("med_config", "file", "med_config.json, the BERT config", required=False),
    )
    Options = ImageRewardOptions
    uses_prompts: ClassVar[bool] = True

    def __init__(self, net: ImageRewardNet, tokenizer: BertTokenizer, *, name: str, image_size: int) -> None:
        self.net = net.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.image_size = image_size

    @classmethod
    def load(cls, request: LoadRequest) -> ImageReward:
        options = request.options
        assert isinstance(options, ImageRewardOptions)
        vision = options.vision.config()
        text = read_med_config(request.weight("med_config")).config(encoder_hidden_size=vision.hidden_size)
        tokenizer = load_bert_tokenizer(request.weights["vocab"])
        if len(tokenizer) > text.vocab_size:
            raise request.fail(
                f"the tokenizer has {len(tokenizer)} tokens but the text encoder only {text.vocab_size} (med_config vocab_size)"
            )
        net = ImageRewardNet(vision, text)
        path = request.weights["model"]
        state = remap_imagereward_state_dict(load_state_dict(path, what="ImageReward checkpoint"))
        load_strict(net, state, path=path)
        net.to(device=request.device, dtype=request.dtype)
        net.mlp.float()  # the head runs in float32 on the .float() [CLS] features, as the reference
        name = request.manifest.display_name(request.manifest_path)
        return cls(net, tokenizer, name=name, image_size=vision.image_size)

    @torch.inference_mode()
    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], *, keys: Sequence[str] | None = None
    ) -> list[float]:
        """(r − 0.16717362830052426) / 1.0333394966054072 per (image, prompt)."""
        check_batch(images, prompts, keys, name=self.name)
        parameter = next(self.net.vision.parameters())
        pixels = clip_transform(images, size=self.image_size).to(
            device=parameter.device, dtype=parameter.dtype
        )
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        ).to(parameter.device)
        raw = self.net(pixels, tokens.input_ids, tokens.attention_mask)
        return ((raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).double().cpu().tolist()
