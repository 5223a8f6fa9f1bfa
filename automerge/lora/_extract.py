"""``extract_lora``: the difference B − A of two checkpoints of one family as LoRA layers, by a truncated
SVD per layer (Eckart–Young: the best rank-r approximation in the Frobenius norm), as kohya's
``networks/extract_lora_from_models.py`` and ComfyUI's ``LoraSave`` (subtract → LoRA) do; unlike them
the factors are not clamped at their 0.99 quantile, so a full-rank extraction reconstructs B.

Layers: those kohya's LoRA and LoCon adapt (``_names``): UNet attention q/k/v/out, feed-forward,
proj_in/proj_out, resnet convs, time_emb_proj, conv_shortcut, down/upsampler convs; text-encoder
attention and MLP (a fused OpenCLIP q/k/v is three layers). Skipped, as kohya's LoRAs leave them: norms,
biases, embeddings (token, position, time_embed, label_emb), conv_in, conv_out, text_projection and the
VAE; also layers where B equals A exactly (a zero delta) and keys that neither checkpoint has.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import torch

from automerge.arch import Architecture
from automerge.checkpoints import Checkpoint
from automerge.errors import ConfigError
from automerge.lora._layer import LoraLayer
from automerge.lora._names import Site, name_index
from automerge.registry import did_you_mean

OVERSAMPLE = 8  # extra columns of the randomized range finder (Halko, Martinsson & Tropp 2011, §4)
POWER_ITERATIONS = 2
RANDOMIZED_MIN_SIDE = 256  # below this, LAPACK's full SVD is as fast


@dataclass(frozen=True)
class Extraction:
    """The extracted layers (scale 1: alpha = rank) and, per MBW block, the share of the difference's
    energy they keep: Σσ_kept² / Σσ² over the block's layers (1.0 where B equals A in the block)."""

    layers: tuple[LoraLayer, ...]
    kept_energy: Mapping[str, float]


def _seed(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def truncated_svd(
    matrix: torch.Tensor, rank: int, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (m, r), σ (r), Vᴴ (r, n) of the ``rank`` largest singular values: LAPACK's SVD, or, when ``rank``
    is well below the smaller side, a randomized range finder with power iterations (Halko et al. 2011,
    Alg. 4.4) seeded by ``generator``."""
    rows, cols = matrix.shape
    side = min(rows, cols)
    rank = min(rank, side)
    if generator is None or side < RANDOMIZED_MIN_SIDE or 4 * rank > side:
        u, sigma, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :rank], sigma[:rank], vh[:rank]
    sketch = torch.randn(
        cols, rank + OVERSAMPLE, generator=generator, device=matrix.device, dtype=matrix.dtype
    )
    basis = torch.linalg.qr(matrix @ sketch).Q  # (m, r + p)
    for _ in range(POWER_ITERATIONS):
        basis = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.T @ basis).Q).Q
    u, sigma, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return (basis @ u)[:, :rank], sigma[:rank], vh[:rank]


def _chosen_blocks(arch: Architecture, blocks: Collection[str] | None) -> tuple[str, ...]:
    if blocks is None:
        return arch.merge_blocks
    for block in blocks:
        if block not in arch.merge_blocks:
            raise ConfigError(
                f"block '{block}' is not a block of {arch.title}{did_you_mean(block, arch.merge_blocks)}; "
                f"blocks: {', '.join(arch.merge_blocks)}"
            )
    return tuple(block for block in arch.merge_blocks if block in blocks)


def _plan(
    a: Checkpoint, b: Checkpoint, arch: Architecture, blocks: tuple[str, ...]
) -> dict[str, tuple[str, list[Site]]]:
    """Original key → (its block, its sites) for every kohya layer in ``blocks``, checked in both models."""
    keys_a, keys_b = set(a.keys()), set(b.keys())
    plan: dict[str, tuple[str, list[Site]]] = {}
    for site in name_index(arch).sites:
        if site.kohya is None or (site.key not in keys_a and site.key not in keys_b):
            continue
        for model, keys in ((a, keys_a), (b, keys_b)):
            if site.key not in keys:
                raise ConfigError(
                    f"{model.path} has no tensor '{site.key}'; both models need complete weights"
                )
        info_a, info_b = a.info(site.key), b.info(site.key)
        if info_a.shape != info_b.shape:
            raise ConfigError(
                f"'{site.key}' is {list(info_a.shape)} in {a.path} but {list(info_b.shape)} in {b.path}; "
                "a difference needs two models of one shape"
            )
        block = arch.block_of(site.key, info_a.dtype)
        if block in blocks:
            plan.setdefault(site.key, (block, []))[1].append(site)
    return plan


def _layer(part: torch.Tensor, site: Site, rank: int, dtype: torch.dtype) -> tuple[LoraLayer, float, float]:
    """One site's layer from its slice of B − A, with the slice's energy and the energy the layer keeps."""
    matrix = part.reshape(part.shape[0], -1)  # (out, in·kh·kw)
    generator = torch.Generator(device=matrix.device).manual_seed(_seed(site.key + str(site.chunk)))
    u, sigma, vh = truncated_svd(matrix, rank, generator=generator)
    up, down = u * sigma, vh  # (out, r), (r, in·kh·kw): σ goes to up, as kohya and ComfyUI put it
    out = part.shape[0]
    rows = None if site.chunk is None else (site.chunk * out, (site.chunk + 1) * out)
    kernel = tuple(part.shape[2:]) if part.ndim == 4 else None
    up, down = up.to("cpu", dtype).contiguous(), down.to("cpu", dtype).contiguous()
    layer = LoraLayer(site.key, up, down, 1.0, rows, kernel=kernel)
    total = float(matrix.to(torch.float64).square().sum())
    return layer, total, float(sigma.to(torch.float64).square().sum())


def extract_lora(
    a: Checkpoint,
    b: Checkpoint,
    arch: Architecture,
    *,
    rank: int,
    blocks: Collection[str] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: Callable[[int, int], None] | None = None,
) -> Extraction:
    """B − A as LoRA layers of rank ≤ ``rank`` (alpha = rank, scale 1, as ComfyUI's and kohya's
    extractors write), for the layers of ``blocks`` (default: all merge blocks; BASE = the text
    encoders). The math runs in float32 on ``device``; the layers are kept on the CPU in ``dtype``.
    ``progress(done, total)`` is told after each original tensor."""
    # 1. Check every input before any tensor is read.
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"rank must be a whole number of at least 1, got {rank!r}")
    plan = _plan(a, b, arch, _chosen_blocks(arch, blocks))
    # 2. Per original tensor: the difference in float32, one truncated SVD per layer it holds.
    layers: list[LoraLayer] = []
    energy: dict[str, list[float]] = {}
    for done, (key, (block, sites)) in enumerate(plan.items(), start=1):
        diff = b.load(key).to(device, torch.float32) - a.load(key).to(device, torch.float32)
        if not bool(torch.isfinite(diff).all()):
            raise ConfigError(
                f"'{key}' holds NaN or infinite values in {a.path} or {b.path}; use sound models"
            )
        sums = energy.setdefault(block, [0.0, 0.0])  # [Σσ², Σσ_kept²]
        for site in sites:
            part = diff if site.chunk is None else diff.chunk(site.chunks)[site.chunk]
            if not bool(part.any()):
                continue
            layer, part_total, part_kept = _layer(part, site, rank, dtype)
            layers.append(layer)
            sums[0] += part_total
            sums[1] += part_kept
        if progress is not None:
            progress(done, len(plan))
    # 3. Kept energy per block, in the family's block order.
    kept_energy = {
        block: (energy[block][1] / energy[block][0] if energy[block][0] > 0 else 1.0)
        for block in arch.merge_blocks
        if block in energy
    }
    return Extraction(tuple(layers), kept_energy)
