"""Aesthetic predictors: an image-only score from a frozen image encoder and a small MLP head.

- ``laion-aesthetic`` (LAION improved aesthetic predictor v2, C. Schuhmann 2022):
  score = MLP(ê), ê = E_CLIP-L/14(image) / ‖E‖, head ``sac+logos+ava1-l14-linearMSE.pth``; ≈ 1–10.
- ``aesthetic-v25`` (aesthetic predictor v2.5, discus0434 2024):
  score = MLP(p̂), p̂ = pooler(SigLIP so400m-patch14-384(image)) / ‖p‖, head ``aesthetic_predictor_v2_5.pth``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from PIL import Image
from torch import nn

from automerge.config import Schema
from automerge.rewards.base import LoadRequest, RewardPlugin, WeightRole, check_batch, register_reward
from automerge.rewards.files import load_state_dict, load_strict
from automerge.rewards.heads import ScoreHead
from automerge.rewards.preprocess import clip_transform
from automerge.rewards.pretrained import image_processor_class, load_local, load_pretrained

if TYPE_CHECKING:
    from transformers import CLIPVisionModelWithProjection, PreTrainedModel, SiglipVisionModel


def _image_tower(base: type[PreTrainedModel], unused: list[str]) -> type[PreTrainedModel]:
    """``base`` that loads from a full two-tower checkpoint, the text tower's tensors (``unused``
    patterns) expected there and deliberately not loaded (transformers' own ignore mechanism, so
    they are neither reported nor counted as unexpected)."""
    return type(f"{base.__name__}ImageTower", (base,), {"_keys_to_ignore_on_load_unexpected": unused})


def _unit(embeds: torch.Tensor) -> torch.Tensor:
    """e / ‖e‖₂ along the last axis, in float32."""
    embeds = embeds.float()
    return embeds / embeds.norm(dim=-1, keepdim=True)


class LaionOptions(Schema):
    """``relu``: the head has ReLUs (layers 0, 3, 6, 9, 11), as the ``…reluMSE`` variants."""

    relu: bool = False


@register_reward("laion-aesthetic")
class LaionAesthetic(RewardPlugin):
    """LAION improved aesthetic predictor v2: MLP on the L2-normalised CLIP image embedding."""

    weight_roles: ClassVar[tuple[WeightRole, ...]] = (
        WeightRole("clip", "dir", "a transformers CLIP ViT-L/14 folder (config.json + model.safetensors)"),
        WeightRole("head", "file", "sac+logos+ava1-l14-linearMSE.pth, the MLP head state dict"),
    )
    Options = LaionOptions
    uses_prompts: ClassVar[bool] = False

    def __init__(self, encoder: CLIPVisionModelWithProjection, head: ScoreHead, *, name: str) -> None:
        self.encoder = encoder
        self.head = head.eval()
        self.name = name
        self.image_size = int(encoder.config.image_size)

    @classmethod
    def load(cls, request: LoadRequest) -> LaionAesthetic:
        options = request.options
        assert isinstance(options, LaionOptions)
        from transformers import CLIPVisionModelWithProjection

        tower = _image_tower(
            CLIPVisionModelWithProjection, [r"^text_model\.", r"^text_projection\.", r"^logit_scale$"]
        )
        encoder = load_pretrained(tower, request.weights["clip"], device=request.device, dtype=request.dtype)
        head = ScoreHead(int(encoder.config.projection_dim), relu=options.relu)
        path = request.weights["head"]
        load_strict(head, load_state_dict(path, what="aesthetic MLP head"), path=path)
        head.to(device=request.device)
        return cls(encoder, head, name=request.manifest.display_name(request.manifest_path))

    @torch.inference_mode()
    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], *, keys: Sequence[str] | None = None
    ) -> list[float]:
        """MLP(e / ‖e‖) per image; prompts are ignored."""
        check_batch(images, prompts, keys, name=self.name)
        parameter = next(self.encoder.parameters())
        pixels = clip_transform(images, size=self.image_size).to(
            device=parameter.device, dtype=parameter.dtype
        )
        embeds = _unit(self.encoder(pixel_values=pixels).image_embeds)  # (B, D)
        return self.head(embeds).double().cpu().tolist()


class _V25Head(nn.Module):
    """Aesthetic predictor v2.5 head: ``scoring_head.{0,2,4,6,8}`` = hidden→1024→128→64→16→1."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.scoring_head = nn.Sequential(
            nn.Linear(hidden_size, 1024),
            nn.Dropout(0.5),
            nn.Linear(1024, 128),
            nn.Dropout(0.5),
            nn.Linear(128, 64),
            nn.Dropout(0.5),
            nn.Linear(64, 16),
            nn.Dropout(0.2),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.scoring_head(embeds)


@register_reward("aesthetic-v25")
class AestheticV25(RewardPlugin):
    """Aesthetic predictor v2.5: MLP on the L2-normalised SigLIP pooled image embedding."""

    weight_roles: ClassVar[tuple[WeightRole, ...]] = (
        WeightRole("siglip", "dir", "a transformers SigLIP folder (google/siglip-so400m-patch14-384)"),
        WeightRole("head", "file", "aesthetic_predictor_v2_5.pth, the MLP head state dict"),
    )
    uses_prompts: ClassVar[bool] = False

    def __init__(
        self, encoder: SiglipVisionModel, image_processor: Any, head: _V25Head, *, name: str
    ) -> None:
        self.encoder = encoder
        self.image_processor = image_processor
        self.head = head.eval()
        self.name = name

    @classmethod
    def load(cls, request: LoadRequest) -> AestheticV25:
        folder = request.weights["siglip"]
        from transformers import SiglipVisionModel

        tower = _image_tower(SiglipVisionModel, [r"^text_model\.", r"^logit_scale$", r"^logit_bias$"])
        encoder = load_pretrained(tower, folder, device=request.device, dtype=request.dtype)
        image_processor = load_local(image_processor_class("Siglip"), folder, what="SigLIP image processor")
        head = _V25Head(int(encoder.config.hidden_size))
        path = request.weights["head"]
        load_strict(head, load_state_dict(path, what="aesthetic v2.5 head"), path=path)
        head.to(device=request.device)
        return cls(encoder, image_processor, head, name=request.manifest.display_name(request.manifest_path))

    @torch.inference_mode()
    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], *, keys: Sequence[str] | None = None
    ) -> list[float]:
        """MLP(p / ‖p‖) per image; prompts are ignored."""
        check_batch(images, prompts, keys, name=self.name)
        parameter = next(self.encoder.parameters())
        pixels = self.image_processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        pixel_values = pixels["pixel_values"].to(device=parameter.device, dtype=parameter.dtype)
        embeds = _unit(self.encoder(pixel_values=pixel_values).pooler_output)  # (B, D)
        return self.head(embeds).squeeze(-1).double().cpu().tolist()
