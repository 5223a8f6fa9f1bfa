"""The block/key rules agree with diffusers' own single-file converters and with the live modules.

Tagged tensors (every element a unique number) go through diffusers' real conversion functions; each
diffusers parameter must equal the view our rules give of the original tensor, and every diffusers
parameter must be reached. At real size, the reference tables' shapes must fit the real-size live
modules (built on the meta device) exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)

from automerge.arch import ARCHITECTURES, Architecture, Component, reference_keys
from automerge.arch._loader import FAMILIES
from automerge.arch._schema import FamilyFile
from automerge.config import parse_file
from automerge.render.modules import build_module, build_modules, live_name
from automerge.tiny import make_tiny_state_dict

Converter = Callable[[Component, Mapping[str, object], dict[str, torch.Tensor]], dict[str, torch.Tensor]]

# diffusers' own converter for each key rule of ours (the rule names of the family data files)
CONVERTERS: dict[str, Converter] = {
    "unet": lambda component, config, tagged: convert_ldm_unet_checkpoint(tagged, dict(config)),
    "vae": lambda component, config, tagged: convert_ldm_vae_checkpoint(tagged, dict(config)),
    "clip": lambda component, config, tagged: convert_ldm_clip_checkpoint(tagged),
    "open_clip": lambda component, config, tagged: convert_open_clip_checkpoint(
        build_module(config, meta=True), tagged, prefix=component.prefix
    ),
}


def _tagged(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for key, tensor in state.items():
        if tensor.dtype.is_floating_point:
            out[key] = torch.arange(offset, offset + tensor.numel(), dtype=torch.float64).reshape(
                tensor.shape
            )
            offset += tensor.numel()
        else:
            out[key] = tensor
    return out


def _diffusers_conversion(
    arch: Architecture, tagged: dict[str, torch.Tensor]
) -> dict[str, dict[str, torch.Tensor]]:
    """Each component converted by the diffusers function for its key rule (named in its data file)."""
    rules = {
        spec.name: spec.keys.rule
        for spec in parse_file(FamilyFile, FAMILIES / f"{arch.name}.yaml").components
    }
    return {
        component.name: CONVERTERS[rules[component.name]](
            component, arch.tiny_configs[component.name], tagged
        )
        for component in arch.components
    }


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_rules_match_diffusers_converters_on_tagged_tensors(family: str) -> None:
    arch = ARCHITECTURES.get(family)
    tagged = _tagged(make_tiny_state_dict(arch, seed=0))
    converted = _diffusers_conversion(arch, tagged)
    reached: dict[str, set[str]] = {name: set() for name in converted}
    for key, tensor in tagged.items():
        for target in arch.targets(key):
            expected = converted[target.component][target.name]
            assert torch.equal(target.apply(tensor), expected), f"{key} -> {target}"
            reached[target.component].add(target.name)
    for component, state in converted.items():
        missing = set(state) - reached[component] - {"text_model.embeddings.position_ids"}
        assert not missing, f"{component}: diffusers parameters our rules never reach: {sorted(missing)[:5]}"


def _check_live_coverage(arch: Architecture, shapes: Mapping[str, tuple[int, ...]], modules: dict) -> None:
    covered: dict[str, set[str]] = {name: set() for name in modules}
    parameters = {component: dict(module.named_parameters()) for component, module in modules.items()}
    for key, shape in shapes.items():
        for target in arch.targets(key):
            module = modules[target.component]
            name = live_name(module, target.name)
            param = parameters[target.component][name]
            view = target.apply(torch.empty(shape, device="meta"))
            assert tuple(view.shape) == tuple(param.shape), f"{key} -> {name}: {view.shape} vs {param.shape}"
            covered[target.component].add(name)
    for name in modules:
        params = set(parameters[name])
        assert params == covered[name], (
            f"{name}: parameters not fed by any key: {sorted(params - covered[name])[:5]}"
        )


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_real_size_reference_shapes_fit_the_real_live_modules(family: str) -> None:
    arch = ARCHITECTURES.get(family)
    shapes = {
        ref.key: ref.shape for ref in reference_keys(family) if ref.component not in ("ema", "scheduler")
    }
    _check_live_coverage(arch, shapes, build_modules(arch.configs, meta=True))


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_tiny_shapes_fit_the_tiny_live_modules(family: str) -> None:
    arch = ARCHITECTURES.get(family)
    state = make_tiny_state_dict(arch, seed=0)
    _check_live_coverage(
        arch, {k: tuple(v.shape) for k, v in state.items()}, build_modules(arch.tiny_configs, meta=True)
    )
