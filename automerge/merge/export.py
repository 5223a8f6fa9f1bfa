"""Streaming export: merge key by key from the memory-mapped sources straight into the output file.

Peak memory stays near one tensor per source (plus the method's temporaries), not whole models.
The file has model A's key names and layout (minus EMA), so A1111 and ComfyUI load it as is, and a
metadata header with the recipe, each source's file name, sha256 and A1111 short hash, A1111's
``sd_merge_recipe`` / ``sd_merge_models`` (in the shape A1111 writes them), modelspec fields and
automerge's version. Written atomically and resumably (``ResumableSafetensorsWriter``): a killed export
run again with the same fingerprint (recipe, output dtype, device, each source's path, size and mtime,
versions, header) merges only the keys the killed run had not written, into the same bytes. Keys are
merged in ``read_order`` (A's order, but a key of more than a tenth of all the bytes is held back
until as many bytes went before it), each written at its place in A's layout: the file does not
depend on the order.
"""

from __future__ import annotations

import itertools
import json
import os
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

from automerge._version import __version__
from automerge.checkpoints import (
    CONFIGS_METADATA_KEY,
    Checkpoint,
    ResumableSafetensorsWriter,
    TensorInfo,
    a1111_legacy_hash,
    a1111_short_hash,
    cached_sha256,
)
from automerge.errors import ConfigError, MergeError
from automerge.gc_scope import long_lived_frozen
from automerge.merge._fused_cpu import fused_kernel
from automerge.merge.methods import (
    LazySources,
    MergeMethod,
    check_finite,
    merge_into,
    merge_run_into,
    noise_for,
)
from automerge.merge.plan import MergePlan
from automerge.merge.read_ahead import ReadAhead, read_bytes

RUN_KEY_NUMEL = 1 << 16
"""Keys of at most this many elements are merged in runs (``merge_run``); larger ones alone."""
RUN_NUMEL = 1 << 20
"""Elements of one run at most."""
WRITES_IN_FLIGHT = 2
"""Merged tensors handed to the writing thread and not yet written, at most, whatever their size …"""
SMALL_WRITES_IN_FLIGHT = 256
"""… or up to this many while they total at most ``WRITE_BYTES_IN_FLIGHT``: a run of small keys comes
out of one kernel call, and waiting on the writer key by key (a thread handoff each) cost ~0.3 s of a
~1.8 s export of 100 tiny SDXL sources (2,518 keys)."""
WRITE_BYTES_IN_FLIGHT = 16 << 20


def merged_tensors(
    plan: MergePlan,
    *,
    dtype: torch.dtype,
    device: str = "cpu",
    skip: Collection[str] = (),
    ready: Callable[[str], None] = lambda key: None,
    keys: Sequence[str] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) in ``keys``' order (default: A's key order, ``exported_keys``): merged keys
    computed, the rest copied from A; EMA dropped, and the keys in ``skip`` (already written by a
    resumed export) neither read nor computed. Small keys
    of an element-wise method are merged a run at a time (``merge_run``), with the same bits; those
    of a method that merges from stored views take them from one view of the run per source.
    ``ready(key)`` is called before the sources' bytes of ``key`` (of a run: its last key) are read
    (``ReadAhead.ready``)."""
    primary = plan.primary.checkpoint
    keys = exported_keys(plan, skip=skip) if keys is None else [key for key in keys if key not in skip]
    runs, viewed_runs = _runs_possible(plan), _viewed_runs_possible(plan, device)
    in_a = primary.keys()
    successor = dict(zip(in_a, itertools.islice(in_a, 1, None), strict=False))
    index = 0
    while index < len(keys):
        key = keys[index]
        info = primary.info(key)
        block = plan.merged_block(key, info.dtype)
        if block is None:  # copied from A: refused with NaN/Inf as the live engine refuses it
            ready(key)
            tensor = plan.load("a", key)
            check_finite(tensor, model=f"a ({plan.primary.path.name})", key=key)
            yield (
                key,
                tensor.to(dtype) if tensor.is_floating_point() and _in_a_block(plan, key, info) else tensor,
            )
            index += 1
            continue
        run = _run_from(plan, keys, index, block, successor) if runs or viewed_runs else [key]
        ready(run[-1])
        merged = None
        if len(run) > 1:
            merge = merge_run if runs else _merge_viewed_run
            merged = merge(plan, run, block=block, dtype=dtype, device=device)
        if merged is None:
            yield key, merge_key(plan, key, block=block, dtype=dtype, device=device)
            index += 1
        else:
            yield from merged
            index += len(run)


def exported_keys(plan: MergePlan, *, skip: Collection[str] = ()) -> list[str]:
    """The keys ``merged_tensors`` yields, in its order."""
    return [key for key in plan.primary.checkpoint.keys() if plan.arch.is_exported(key) and key not in skip]


READ_START_BYTES = 64 << 20
"""A key of at most this many bytes (of all the sources it is read from) may go first."""
HOLD_SHARE = 0.1
"""Only a key of more than this share of all the bytes read is held back by ``read_order``."""


def read_order(sizes: Sequence[tuple[str, int]]) -> list[str]:
    """The keys (each with its bytes, of all the sources it is read from) in the order the export
    reads and merges them: as given, except that a key of more than ``HOLD_SHARE`` of all the bytes
    goes only once keys of at least its bytes (or ``READ_START_BYTES``) went before it; one held back
    goes as soon as that holds (those held back in their order), the rest at the end. So the merge
    does not start by waiting for one large key's read with the cores idle: 100 tiny SDXL sources'
    first keys include their two token embeddings (27 % of the bytes each, a ~0.3 s read). A key
    of a few per cent (a real-size model's token embedding) keeps its place: the wait is as small a
    share, and out of order reads measured no faster. The written file is the same in any order."""
    held_from = HOLD_SHARE * sum(size for _, size in sizes)
    order: list[str] = []
    held: deque[tuple[str, int]] = deque()
    before = 0
    for key, size in sizes:
        if size <= max(before, READ_START_BYTES) or size <= held_from:
            order.append(key)
            before += size
        else:
            held.append((key, size))
        while held and held[0][1] <= max(before, READ_START_BYTES):
            taken, taken_size = held.popleft()
            order.append(taken)
            before += taken_size
    order.extend(key for key, _ in held)
    return order


def source_reads(plan: MergePlan, keys: Sequence[str]) -> list[tuple[str, tuple[Checkpoint, ...]]]:
    """Each key and the checkpoints its merge reads (model A alone for a key copied from it), one
    tuple for all the keys read from the same ones."""
    primary = plan.primary.checkpoint
    names = dict.fromkeys([*plan.model_names, *([plan.base_name] if plan.base_name else [])])
    merged = tuple(plan.sources[name].checkpoint for name in names)
    copied = (primary,)
    return [(key, merged if plan.merged_block(key, primary.info(key).dtype) else copied) for key in keys]


def _runs_possible(plan: MergePlan) -> bool:
    """Runs give each key its own bits only for element-wise, non-random methods (no element depends
    on another, no per-key noise) on sources without LoRAs (applied per key)."""
    return plan.method.elementwise and not plan.method.random and not any(plan.loras.values())


def _viewed_runs_possible(plan: MergePlan, device: str) -> bool:
    """A method that merges from the stored sources (``stored_into``) on the CPU, over any number of
    models without LoRAs, takes each key's views as slices of one view of a run of small keys per
    source (at a small width the per-key reads of N files cost as much as the merge)."""
    method = plan.method
    return (
        device == "cpu"
        and method.stored_into is not None
        and method.max_models is None
        and not any(plan.loras.values())
    )


def _merge_viewed_run(
    plan: MergePlan, keys: Sequence[str], *, block: str, dtype: torch.dtype, device: str = "cpu"
) -> list[tuple[str, torch.Tensor]] | None:
    """``merge_key`` of each of ``keys``, its sources' views sliced from one view of the run per
    source; None when the keys do not lie back to back in one dtype in every source."""
    views = {name: plan.sources[name].checkpoint.load_run(keys) for name in plan.model_names}
    flat = {name: view for name, view in views.items() if view is not None}
    if len(flat) != len(views):
        return None
    whole = _merged_as_one(plan, keys, flat, block=block, dtype=dtype)
    if whole is not None:
        return whole
    merged = []
    for key, part, _ in _key_parts(plan, keys):
        stored = {name: view[part] for name, view in flat.items()}  # flat: stored_into reads elements
        merged.append((key, merge_key(plan, key, block=block, dtype=dtype, device=device, stored=stored)))
    return merged


def _key_parts(plan: MergePlan, keys: Sequence[str]) -> list[tuple[str, slice, TensorInfo]]:
    """Each of a run's keys, its elements in the run's flat view, and its info (from A)."""
    parts, offset = [], 0
    for key in keys:
        info = plan.primary.checkpoint.info(key)
        parts.append((key, slice(offset, offset + info.numel), info))
        offset += info.numel
    return parts


def _split_run(plan: MergePlan, keys: Sequence[str], out: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """A run's merged flat tensor as each key's view, in its shape."""
    return [(key, out[part].view(info.shape)) for key, part, info in _key_parts(plan, keys)]


def _merged_as_one(
    plan: MergePlan, keys: Sequence[str], views: Mapping[str, torch.Tensor], *, block: str, dtype: torch.dtype
) -> list[tuple[str, torch.Tensor]] | None:
    """The keys of a viewed run merged in one call (``merge_run_into``: the method's
    ``stored_run_into``), each a view of one output; None when that cannot be done."""
    if plan.method.stored_run_into is None:
        return None
    base = plan.sources[plan.base_name].checkpoint.load_run(keys) if plan.base_name else None
    if plan.base_name and base is None:
        return None
    sizes = [info.numel for _, _, info in _key_parts(plan, keys)]
    out = torch.empty(sum(sizes), dtype=dtype)
    merged = merge_run_into(
        out,
        plan.method,
        [views[name] for name in plan.model_names],
        base,
        keys=keys,
        sizes=sizes,
        params=plan.params.for_block(block),
        seed=plan.seed,
        weights=plan.params.model_weights(block, plan.model_names),
        compute_dtype=plan.compute_dtype,
    )
    return _split_run(plan, keys, out) if merged else None


def _run_from(
    plan: MergePlan, keys: Sequence[str], index: int, block: str, successor: Mapping[str, str]
) -> list[str]:
    """``keys[index]`` and the small keys after it in the same block, each A's next key after the one
    before it (``successor``; a key moved by ``read_order`` ends a run), up to ``RUN_NUMEL``
    elements (whether they lie back to back in every source is ``merge_run``'s question)."""
    primary = plan.primary.checkpoint
    run: list[str] = []
    total = 0
    for key in itertools.islice(keys, index, None):
        info = primary.info(key)
        if info.numel > RUN_KEY_NUMEL or total + info.numel > RUN_NUMEL:
            break
        if run and (successor.get(run[-1]) != key or plan.merged_block(key, info.dtype) != block):
            break
        run.append(key)
        total += info.numel
    return run or [keys[index]]


def merge_run(
    plan: MergePlan, keys: Sequence[str], *, block: str, dtype: torch.dtype, device: str = "cpu"
) -> list[tuple[str, torch.Tensor]] | None:
    """(key, merged tensor) of each of ``keys`` (one block, an element-wise method), merged as one flat
    tensor over one view of each source's bytes: per element the same operations as ``merge_key``,
    without its per-key calls (at a small width, most of an N-model export). None when the keys do not
    lie back to back in one dtype in every source, or on a ``MergeError`` (NaN/Inf: then ``merge_key``
    names the key and the source)."""
    names = [*plan.model_names, *([plan.base_name] if plan.base_name else [])]
    views = {name: plan.sources[name].checkpoint.load_run(keys) for name in names}
    flat = {name: view for name, view in views.items() if view is not None}
    if len(flat) != len(names):
        return None
    numel = next(iter(flat.values())).numel()
    base = flat[plan.base_name].to(device) if plan.base_name else None
    try:
        if plan.method.max_models is None:
            loaders = [partial(_upcast, flat[name], device, plan.compute_dtype) for name in plan.model_names]
            stored = [partial(_view, flat[name]) for name in plan.model_names] if device == "cpu" else None
            models: Sequence[torch.Tensor] = LazySources(
                loaders, shape=(numel,), dtype=plan.compute_dtype, stored=stored
            )
            magnitude = None
            if base is not None:
                check_finite(base, model=plan.base_name, key=keys[0])
        else:
            models = [flat[name].to(device) for name in plan.model_names]
            loaded = [*models, *([base] if base is not None else [])]
            magnitude = max(
                check_finite(tensor, model=name, key=keys[0])
                for name, tensor in zip(names, loaded, strict=True)
            )
        out = torch.empty(numel, dtype=dtype, device=device)
        _merge_block_into(plan, out, models, base, key=keys[0], block=block, magnitude=magnitude)
    except MergeError:
        return None
    return _split_run(plan, keys, out)


def _upcast(tensor: torch.Tensor, device: str, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(device).to(dtype)


def _view(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _in_a_block(plan: MergePlan, key: str, info: TensorInfo) -> bool:
    """Unmerged block tensors (the VAE when not merged) take the output dtype; buffers keep theirs."""
    return plan.arch.block_of(key, info.dtype) is not None


def merge_key(
    plan: MergePlan,
    key: str,
    *,
    block: str,
    dtype: torch.dtype,
    device: str = "cpu",
    stored: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One merged tensor in ``dtype`` (computed in the plan's compute dtype, like the live engine);
    sources are checked for NaN/Inf as they are read. Methods of any number of models stream over
    ``LazySources`` (each model read when the method reaches it, so memory does not grow with the
    number of models); the others get their sources loaded, with max |x| for the growth bound.
    ``stored``: the models' views of ``key`` already taken (``_merge_viewed_run``), else read here."""
    base = _load(plan, plan.base_name, key, device) if plan.base_name else None
    deferred = plan.method.max_models is None and _carries_non_finite(plan.method)
    if plan.method.max_models is None:
        models: Sequence[torch.Tensor] = _lazy_sources(plan, key, device, check=not deferred, stored=stored)
        magnitude = None  # N-model methods have no growth bound to use it with
    else:
        loaded = [_load(plan, name, key, device) for name in plan.model_names]
        models = [tensor for tensor, _ in loaded]
        magnitude = max(found for _, found in [*loaded, *([base] if base is not None else [])])
    shape = plan.sources[plan.model_names[0]].checkpoint.info(key).shape
    out = torch.empty(shape, dtype=dtype, device=device)
    try:
        _merge_block_into(
            plan, out, models, None if base is None else base[0], key=key, block=block, magnitude=magnitude
        )
    except MergeError:
        if plan.method.max_models is None:  # name the damaged source, when one is (else: as raised)
            for name in plan.model_names:
                _load(plan, name, key, device)
        raise
    return out


def _merge_block_into(
    plan: MergePlan,
    out: torch.Tensor,
    models: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    key: str,
    block: str,
    magnitude: float | None,
) -> None:
    """``merge_into`` with ``block``'s parameters and weights and ``key``'s noise (a run of keys is
    merged only by non-random methods, so its first key names it)."""
    merge_into(
        out,
        plan.method,
        models,
        base,
        key=key,
        params=plan.params.for_block(block),
        noise=noise_for(key, plan.seed) if plan.method.random else None,
        weights=plan.params.model_weights(block, plan.model_names),
        compute_dtype=plan.compute_dtype,
        source_magnitude=magnitude,
    )


def _carries_non_finite(method: MergeMethod) -> bool:
    """Element-wise, non-random methods are sums and products of their sources, so a NaN or Inf in
    any source makes the result non-finite (0·Inf is NaN too): the output's check catches it, and the
    sources need no check of their own (N fewer passes per key) unless it fails."""
    return method.elementwise and not method.random


def _lazy_sources(
    plan: MergePlan, key: str, device: str, *, check: bool, stored: Mapping[str, torch.Tensor] | None = None
) -> LazySources:
    """The non-base models' tensors ``key``, read on each access (and checked for NaN/Inf when
    ``check``), in the compute dtype (the upcast the merge would make anyway); on the CPU, without
    LoRAs, also their views as stored (``stored``'s when given), for consumers that convert and
    check as they read."""
    shape = plan.sources[plan.model_names[0]].checkpoint.info(key).shape
    loaders = [partial(_load_upcast, plan, name, key, device, check=check) for name in plan.model_names]
    views = None
    if stored is not None:
        views = [partial(_view, stored[name]) for name in plan.model_names]
    elif device == "cpu" and not any(plan.loras_on(name, key) for name in plan.model_names):
        views = [partial(plan.load, name, key) for name in plan.model_names]
    return LazySources(loaders, shape=shape, dtype=plan.compute_dtype, stored=views)


def _load_upcast(plan: MergePlan, name: str, key: str, device: str, *, check: bool) -> torch.Tensor:
    tensor = _load(plan, name, key, device)[0] if check else plan.load(name, key).to(device)
    return tensor.to(plan.compute_dtype)


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


ExportProgress = Callable[[int, int, int, int], None]
"""``progress(done_keys, total_keys, done_bytes, total_bytes)``: called once before the first key (the
counts then are what a resumed export found already written) and after each key."""


@long_lived_frozen()  # the collector's full passes paused the loop for 0.1–0.24 s each
def export_merge(
    plan: MergePlan,
    out: Path,
    *,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    extra_metadata: Mapping[str, str] | None = None,
    title: str | None = None,
    progress: ExportProgress | None = None,
    notify: Callable[[str], None] | None = None,
) -> Path:
    """Merge ``plan`` into the safetensors file ``out`` (streamed, atomic, resumable) in ``dtype``
    (default: the plan's); returns ``out``.

    The sources are hashed (through the hash cache) in background threads while the merge runs; the
    header is written first with placeholder hashes of the final length and rewritten in place
    before the file is committed. Until then the bytes go to ``.<name>.partial`` beside ``out``, with a
    journal of the keys written: an export killed or interrupted (KeyboardInterrupt) is continued by
    the next call with the same fingerprint, which merges only the missing keys; one that fails on its
    inputs (``MergeError``) deletes them. ``notify`` gets one line when a partial export is resumed or
    discarded (and why); ``progress`` gets the counts (see ``ExportProgress``).
    """
    refuse_source_as_output(plan, out)
    out_dtype = dtype or plan.dtype
    infos = output_infos(plan, dtype=out_dtype)
    files = {name: model.path for name, model in plan.sources.items() if model.path.is_file()}
    placeholders = {name: f"{i:064x}" if name in files else "" for i, name in enumerate(plan.sources, 1)}
    fingerprint = export_fingerprint(plan, dtype=out_dtype, device=device)
    workers = max(1, min(len(files), os.cpu_count() or 1))  # hashing is CPU-bound: a thread per core
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="automerge-sha256")
    try:
        hashing = {name: pool.submit(cached_sha256, path) for name, path in files.items()}
        metadata = export_metadata(plan, extra=extra_metadata, title=title, digests=placeholders)
        reads = dict(source_reads(plan, list(infos)))
        order = read_order([(key, read_bytes(key, checkpoints)) for key, checkpoints in reads.items()])
        with ResumableSafetensorsWriter(
            out, infos, metadata=metadata, fingerprint=fingerprint, order=order
        ) as writer:
            _announce(writer, total=len(infos), notify=notify or (lambda line: None))
            _write_merged(plan, writer, infos, reads, dtype=out_dtype, device=device, progress=progress)
            digests = {name: hashing[name].result() if name in hashing else "" for name in plan.sources}
            writer.update_metadata(export_metadata(plan, extra=extra_metadata, title=title, digests=digests))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return out


def _announce(writer: ResumableSafetensorsWriter, *, total: int, notify: Callable[[str], None]) -> None:
    if writer.discarded:
        notify(f"discarded the partial merge {writer.partial.name}: {writer.discarded}; starting over")
    if writer.done:
        notify(f"resuming: {len(writer.done)} of {total} keys already merged")


def _write_merged(
    plan: MergePlan,
    writer: ResumableSafetensorsWriter,
    infos: Mapping[str, TensorInfo],
    reads: Mapping[str, tuple[Checkpoint, ...]],
    *,
    dtype: torch.dtype,
    device: str,
    progress: ExportProgress | None,
) -> None:
    """Merge and write every key the writer does not hold yet, in its order (``read_order``), reporting
    the counts after each is written and journaled. The sources are read ahead (``ReadAhead``, from
    ``reads``: each key's ``source_reads``), and each tensor is written by a thread while the next
    keys merge, at most ``WRITES_IN_FLIGHT`` waiting (or ``SMALL_WRITES_IN_FLIGHT`` small ones): the
    disk reads, the merge computes and the output is written at once. Whatever stops the loop (an
    interrupt, an error), the tensors already handed over are written and reported before it leaves,
    so the last count reported is what the journal holds."""
    report = progress or (lambda *counts: None)
    total_bytes = sum(info.nbytes for info in infos.values())
    keys, done_bytes = len(writer.done), sum(infos[key].nbytes for key in writer.done)
    report(keys, len(infos), done_bytes, total_bytes)
    pending: deque[tuple[str, Future[None]]] = deque()
    pending_bytes = 0

    def finish_oldest() -> None:
        nonlocal keys, done_bytes, pending_bytes
        key, written = pending.popleft()
        written.result()  # a failed write raises here, the first one first
        pending_bytes -= infos[key].nbytes
        keys, done_bytes = keys + 1, done_bytes + infos[key].nbytes
        report(keys, len(infos), done_bytes, total_bytes)

    remaining = writer.pending
    kernel = fused_kernel()
    with (
        ReadAhead([(key, reads[key]) for key in remaining]) as ahead,
        ThreadPoolExecutor(1, thread_name_prefix="automerge-write") as writing,
        kernel.scratch_kept() if kernel is not None else nullcontext(),
    ):
        try:
            for key, tensor in merged_tensors(
                plan, dtype=dtype, device=device, ready=ahead.ready, keys=remaining
            ):
                pending.append((key, writing.submit(writer.write, key, tensor.cpu())))
                pending_bytes += infos[key].nbytes
                ahead.passed(key)
                while write_backlog_full(len(pending), pending_bytes) or (pending and pending[0][1].done()):
                    finish_oldest()
        finally:  # also when interrupted: what was handed over is written and reported
            while pending:
                finish_oldest()


def write_backlog_full(tensors: int, nbytes: int) -> bool:
    """Whether the merge waits for the writer: more than ``WRITES_IN_FLIGHT`` tensors handed over and
    not written, unless they are at most ``SMALL_WRITES_IN_FLIGHT`` of ``WRITE_BYTES_IN_FLIGHT`` in all."""
    if tensors <= WRITES_IN_FLIGHT:
        return False
    return tensors > SMALL_WRITES_IN_FLIGHT or nbytes > WRITE_BYTES_IN_FLIGHT


def export_fingerprint(plan: MergePlan, *, dtype: torch.dtype, device: str) -> dict[str, str]:
    """What determines the exported bytes besides the header, each part under the name a resumed
    export reports it by when it changed: recipe, output dtype, device kind, each source file's path,
    size and mtime (LoRAs too), automerge's and torch's versions."""
    recipe = plan.recipe().to_yaml_dict(model_path=lambda path: str(path.absolute()))
    fingerprint = {
        "the recipe": json.dumps(recipe, sort_keys=True),
        "the output dtype": str(dtype),
        "the device": torch.device(device).type,
        "automerge's version": __version__,
        "torch's version": torch.__version__,
    }
    for name, model in plan.sources.items():
        fingerprint[f"model {name} ({model.path.name})"] = _stamp(model.path)
    for entries in plan.loras.values():
        for name, lora in entries:
            fingerprint[f"LoRA {name} ({lora.path.name})"] = _stamp(lora.path)
    return fingerprint


def _stamp(path: Path) -> str:
    """Path, size and modification time of a file, or of each file of a diffusers folder."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stats = [(file, file.stat()) for file in files]
    return "\n".join(f"{file.absolute()} {stat.st_size} {stat.st_mtime_ns}" for file, stat in stats)
