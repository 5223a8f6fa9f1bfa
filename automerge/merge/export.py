"""Streaming export: merge key by key from the memory-mapped sources straight into the output file.

Peak memory stays near one tensor per source (plus the method's temporaries), not whole models.
The file has model A's key names and layout (minus EMA), so A1111 and ComfyUI load it as is, and a
metadata header with the recipe, each source's file name, sha256 and A1111 short hash, A1111's
``sd_merge_recipe`` / ``sd_merge_models`` (in the shape A1111 writes them), modelspec fields and
automerge's version. Written atomically (temporary file + rename).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from automerge._version import __version__
from automerge.checkpoints import (
    CONFIGS_METADATA_KEY,
    SafetensorsWriter,
    TensorInfo,
    a1111_legacy_hash,
    a1111_short_hash,
    cached_sha256,
)
from automerge.errors import ConfigError
from automerge.merge.methods import check_finite, generator_for, merge_into
from automerge.merge.plan import MergePlan


def merged_tensors(
    plan: MergePlan, *, dtype: torch.dtype, device: str = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) in A's key order: merged keys computed, the rest copied from A; EMA dropped."""
    primary = plan.primary.checkpoint
    for key in primary.keys():
        if not plan.arch.is_exported(key):
            continue
        info = primary.info(key)
        block = plan.merged_block(key, info.dtype)
        if block is None:  # copied from A: refused with NaN/Inf as the live engine refuses it
            tensor = plan.load("a", key)
            check_finite(tensor, model=f"a ({plan.primary.path.name})", key=key)
            yield (
                key,
                tensor.to(dtype) if tensor.is_floating_point() and _in_a_block(plan, key, info) else tensor,
            )
            continue
        yield key, merge_key(plan, key, block=block, dtype=dtype, device=device)


def _in_a_block(plan: MergePlan, key: str, info: TensorInfo) -> bool:
    """Unmerged block tensors (the VAE when not merged) take the output dtype; buffers keep theirs."""
    return plan.arch.block_of(key, info.dtype) is not None


def merge_key(
    plan: MergePlan, key: str, *, block: str, dtype: torch.dtype, device: str = "cpu"
) -> torch.Tensor:
    """One merged tensor in ``dtype`` (computed in the plan's compute dtype, like the live engine);
    sources are checked for NaN/Inf first."""
    names = [*plan.model_names, *([plan.base_name] if plan.base_name else [])]
    loaded = {name: _load(plan, name, key, device) for name in names}
    models = [loaded[name][0] for name in plan.model_names]
    base = loaded[plan.base_name][0] if plan.base_name else None
    generator = generator_for(key, plan.seed, device) if plan.method.random else None
    out = torch.empty(models[0].shape, dtype=dtype, device=device)
    merge_into(
        out,
        plan.method,
        models,
        base,
        key=key,
        params=plan.params.for_block(block),
        generator=generator,
        compute_dtype=plan.compute_dtype,
        source_magnitude=max(magnitude for _, magnitude in loaded.values()),
    )
    return out


def _load(plan: MergePlan, name: str, key: str, device: str) -> tuple[torch.Tensor, float]:
    """Source ``name``'s tensor (its LoRAs applied) on ``device`` and its max |x|; NaN/Inf raise
    ``MergeError``."""
    tensor = plan.load(name, key).to(device)
    return tensor, check_finite(tensor, model=f"{name} ({plan.sources[name].path.name})", key=key)


def output_infos(plan: MergePlan, *, dtype: torch.dtype) -> dict[str, TensorInfo]:
    """Shapes and dtypes of the output file, known before anything is merged (the header comes first)."""
    primary = plan.primary.checkpoint
    infos = {}
    for key in primary.keys():
        if not plan.arch.is_exported(key):
            continue
        info = primary.info(key)
        floating = info.dtype.is_floating_point and plan.arch.block_of(key, info.dtype) is not None
        infos[key] = TensorInfo(info.shape, dtype if floating else info.dtype)
    return infos


def export_metadata(
    plan: MergePlan,
    *,
    extra: Mapping[str, str] | None = None,
    title: str | None = None,
    digests: Mapping[str, str],
) -> dict[str, str]:
    """The output header: recipe, sources with hashes, modelspec, version, and caller's ``extra``.

    ``digests``: each source's sha256 by model letter, "" for a diffusers folder (no single file).
    """
    sources = [
        {
            "name": name,
            "file": model.path.name,
            "sha256": digests[name],
            "autov2": a1111_short_hash(digests[name]) if digests[name] else "",
        }
        for name, model in plan.sources.items()
    ]
    recipe = plan.recipe().to_yaml_dict(model_path=lambda path: path.name)
    metadata = {
        "automerge.version": __version__,
        "automerge.recipe": json.dumps(recipe, sort_keys=True),
        "automerge.sources": json.dumps(sources),
        "sd_merge_recipe": json.dumps(a1111_merge_recipe(plan, digests, title=title)),
        "sd_merge_models": json.dumps(a1111_merge_models(plan, digests)),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": plan.arch.modelspec_architecture,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title
        or f"automerge {plan.method.name} of {', '.join(s['file'] for s in sources)}",
        "modelspec.predict_key": "v" if plan.arch.prediction_type == "v_prediction" else "epsilon",
    }
    configs = plan.primary.checkpoint.metadata.get(CONFIGS_METADATA_KEY)
    if configs is not None:  # tiny models carry their live-module configs
        metadata[CONFIGS_METADATA_KEY] = configs
    metadata.update(extra or {})
    return metadata


A1111_INTERP_METHODS = {"weighted_sum": "Weighted sum", "add_difference": "Add difference"}
"""A1111's ``interp_method`` names for the methods its merger has; others keep automerge's name."""


def a1111_merge_recipe(
    plan: MergePlan, digests: Mapping[str, str], *, title: str | None
) -> dict[str, object]:
    """``sd_merge_recipe`` with A1111's fields (``type`` "automerge"): the first three sources' sha256
    as primary / secondary / tertiary, ``multiplier`` = alpha where one number holds for every block
    (else None, and ``block_weights`` per block), and automerge's own fields after them."""
    hashes = [digests[name] or None for name in plan.sources]
    params = plan.params.as_recipe()
    alpha = params.get("alpha")
    return {
        "type": "automerge",
        "primary_model_hash": hashes[0],
        "secondary_model_hash": hashes[1] if len(hashes) > 1 else None,
        "tertiary_model_hash": hashes[2] if len(hashes) > 2 else None,
        "interp_method": A1111_INTERP_METHODS.get(plan.method.name, plan.method.name),
        "multiplier": alpha if isinstance(alpha, float | int) else None,
        "save_as_half": plan.dtype == torch.float16,
        "custom_name": title or "",
        "config_source": 0,
        "bake_in_vae": "None",
        "discard_weights": "",
        "is_inpainting": False,
        "is_instruct_pix2pix": False,
        "method": plan.method.name,
        "params": {name: value for name, value in params.items() if not isinstance(value, dict)},
        "block_weights": {name: value for name, value in params.items() if isinstance(value, dict)},
        "models": {name: model.path.name for name, model in plan.sources.items()},
    }


def a1111_merge_models(plan: MergePlan, digests: Mapping[str, str]) -> dict[str, dict[str, object]]:
    """``sd_merge_models`` as A1111 writes it: {sha256: {name, legacy_hash, sd_merge_recipe}} for each
    source file, merged with each source's own ``sd_merge_models`` (the lineage of a merge of merges)."""
    models: dict[str, dict[str, object]] = {}
    for name, model in plan.sources.items():
        if not digests[name]:
            continue  # a diffusers folder: no single file to hash
        metadata = model.checkpoint.metadata
        models[digests[name]] = {
            "name": model.path.name,
            "legacy_hash": a1111_legacy_hash(model.path),
            "sd_merge_recipe": metadata.get("sd_merge_recipe"),
            "role": name,
        }
        try:
            lineage = json.loads(metadata.get("sd_merge_models", "{}"))
        except json.JSONDecodeError:
            lineage = {}
        if isinstance(lineage, dict):
            models.update({k: v for k, v in lineage.items() if k not in models})
    return models


def refuse_source_as_output(plan: MergePlan, out: Path) -> None:
    """The output must not be one of the sources (the same file by path, link or inode): the atomic
    rename at the end would replace the user's model with the merge."""
    if not out.exists():
        return
    for name, model in plan.sources.items():
        if model.path.is_file() and out.samefile(model.path):
            raise ConfigError(
                f"{out}: the output is model '{name}' ({model.path}) itself; write the merge to another path"
            )


def export_merge(
    plan: MergePlan,
    out: Path,
    *,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    extra_metadata: Mapping[str, str] | None = None,
    title: str | None = None,
) -> Path:
    """Merge ``plan`` into the safetensors file ``out`` (streamed, atomic) in ``dtype`` (default: the
    plan's); returns ``out``.

    The sources are hashed (through the hash cache) in background threads while the merge runs; the
    header is written first with placeholder hashes of the final length and rewritten in place
    before the file is committed.
    """
    refuse_source_as_output(plan, out)
    out_dtype = dtype or plan.dtype
    infos = output_infos(plan, dtype=out_dtype)
    files = {name: model.path for name, model in plan.sources.items() if model.path.is_file()}
    placeholders = {name: f"{i:064x}" if name in files else "" for i, name in enumerate(plan.sources, 1)}
    pool = ThreadPoolExecutor(max_workers=max(1, len(files)), thread_name_prefix="automerge-sha256")
    try:
        hashing = {name: pool.submit(cached_sha256, path) for name, path in files.items()}
        metadata = export_metadata(plan, extra=extra_metadata, title=title, digests=placeholders)
        with SafetensorsWriter(out, infos, metadata=metadata) as writer:
            for key, tensor in merged_tensors(plan, dtype=out_dtype, device=device):
                writer.write(key, tensor.cpu())
            digests = {name: hashing[name].result() if name in hashing else "" for name in plan.sources}
            writer.update_metadata(export_metadata(plan, extra=extra_metadata, title=title, digests=digests))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return out
