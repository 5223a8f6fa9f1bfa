"""CLIP score (Hessel et al. 2021, "CLIPScore") and PickScore (Kirstain et al. 2023, "Pick-a-Pic"):
one ``CLIPModel`` code path over a local folder.

score = exp(logit_scale) · cos(E_image(image), E_text(prompt))

PickScore is CLIP-H/14 fine-tuned on human preferences (weights ``yuvalkirstain/PickScore_v1``,
processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``); the CLIPScore metric convention
max(100·cos, 0) is the same formula with logit_scale = ln 100, clamping aside.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from PIL import Image

from automerge.errors import RewardError
from automerge.rewards.base import LoadRequest, RewardPlugin, WeightRole, check_batch, register_reward
from automerge.rewards.pretrained import features, image_processor_class, load_local, load_pretrained

if TYPE_CHECKING:
    from transformers import CLIPModel

MAX_TOKENS = 77


@register_reward("clip-score")
@register_reward("pickscore")  # same formula and classes; the manifest points at PickScore's weights
class ClipScore(RewardPlugin):
    """exp(logit_scale) · cos(image, prompt) with a CLIP model; higher = closer to the prompt."""

    weight_roles: ClassVar[tuple[WeightRole, ...]] = (
        WeightRole("model", "dir", "a transformers CLIPModel folder (config.json + model.safetensors)"),
        WeightRole(
            "processor",
            "dir",
            "tokenizer + preprocessor_config.json; default: the model folder",
            required=False,
        ),
    )
    uses_prompts: ClassVar[bool] = True

    def __init__(self, model: CLIPModel, tokenizer: Any, image_processor: Any, *, name: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.name = name

    @classmethod
    def load(cls, request: LoadRequest) -> ClipScore:
        from transformers import CLIPModel, CLIPTokenizer

        processor_dir = request.weight("processor") or request.weights["model"]
        model = load_pretrained(
            CLIPModel, request.weights["model"], device=request.device, dtype=request.dtype
        )
        _check_tokenizer_files(processor_dir)
        tokenizer = load_local(CLIPTokenizer, processor_dir, what="CLIP tokenizer")
        image_processor = load_local(
            image_processor_class("CLIP"), processor_dir, what="CLIP image processor"
        )
        return cls(
            model, tokenizer, image_processor, name=request.manifest.display_name(request.manifest_path)
        )

    @torch.inference_mode()
    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], *, keys: Sequence[str] | None = None
    ) -> list[float]:
        """exp(logit_scale) · cos(image_i, prompt_i) per image."""
        check_batch(images, prompts, keys, name=self.name)
        parameter = next(self.model.parameters())
        pixels = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        text = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        ).to(parameter.device)
        image_embeds = features(
            self.model.get_image_features(
                pixel_values=pixels.to(device=parameter.device, dtype=parameter.dtype)
            )
        ).float()  # (B, D)
        text_embeds = features(
            self.model.get_text_features(input_ids=text.input_ids, attention_mask=text.attention_mask)
        ).float()  # (B, D)
        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
        cosine = (image_embeds * text_embeds).sum(dim=-1)  # (B,)
        return (self.model.logit_scale.float().exp() * cosine).double().cpu().tolist()


def _check_tokenizer_files(folder: Path) -> None:
    """CLIPTokenizer.from_pretrained on a folder without its files silently builds a 2-token
    tokenizer (transformers 5): require tokenizer.json, or vocab.json + merges.txt."""
    if (folder / "tokenizer.json").is_file() or all(
        (folder / name).is_file() for name in ("vocab.json", "merges.txt")
    ):
        return
    raise RewardError(f"{folder}: no CLIP tokenizer files (tokenizer.json, or vocab.json and merges.txt)")
