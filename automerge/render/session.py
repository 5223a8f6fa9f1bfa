"""``RenderSession``: the one builder of "merge plan → live engine → live modules → pipeline →
renderer". ``automerge render``, a study's runtime, reference renders and the benchmarks all render
through it, so a setting has one default and one meaning everywhere.

The session keeps the plan's sources resident on the device (``LiveEngine``); the pipeline's modules are
views of the engine's merged weights, so ``apply(params)`` changes what the next ``render`` draws,
without copying weights or writing a file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from automerge.merge import BlockParams, EngineOptions, LiveEngine, MergePlan
from automerge.render.config import RenderConfig
from automerge.render.modules import bind_modules
from automerge.render.payload import RenderJob
from automerge.render.pipeline import build_pipeline, pipeline_modules
from automerge.render.renderer import RenderedImage, Renderer
from automerge.render.tokenizers import TokenizerCache


class RenderSession:
    """A merge made live and renderable: ``apply`` a parameter set, then ``render`` jobs."""

    def __init__(
        self,
        plan: MergePlan,
        config: RenderConfig | None = None,
        *,
        tokenizers: TokenizerCache | None = None,
        status: Callable[[str], None] | None = None,
        live_loras: frozenset[str] = frozenset(),
    ) -> None:
        """Load the plan's sources onto the device and build the pipeline around them (the plan stays
        the caller's to close). ``tokenizers``: a cache shared by several sessions of one process;
        ``status(text)`` is told each phase as it starts (the terminal's status line);
        ``live_loras``: LoRAs whose strength ``apply`` may change (a study searching them)."""
        status = status or (lambda text: None)
        self.plan = plan
        self.config = config or RenderConfig()
        # 1. Where: device and dtypes, checked before any tensor is loaded.
        self.device = self.config.torch_device()
        self.dtype = self.config.torch_dtype(self.device)
        options = EngineOptions(
            device=str(self.device),
            dtype=self.dtype,
            source_dtype=self.config.storage_dtype(self.device),
            offload=self.config.offload,
            live_loras=live_loras,
        )
        # 2. The engine: sources resident, merged weights in flat per-block buffers.
        status(f"loading {len(plan.sources)} source models onto {self.device}")
        self.engine = LiveEngine(plan, options)
        # 3. Live modules as views of those weights, the pipeline around them, the renderer.
        status("building the pipeline around the live weights")
        modules = bind_modules(plan.primary.configs, self.engine.live_parameters(), device=self.device)
        live = pipeline_modules(modules, family=plan.arch.name, prediction_type=plan.arch.prediction_type)
        self.pipeline = build_pipeline(
            live,
            tokenizer_dir=self.config.tokenizer_dir,
            device=self.device,
            dtype=self.dtype,
            compile_unet=self.config.compile,
            tokenizers=tokenizers,
        )
        self.renderer = Renderer(
            self.pipeline, batch_size=self.config.batch_size, device=self.device, dtype=self.dtype
        )

    def apply(self, params: BlockParams | None = None) -> set[str]:
        """Merge ``params`` (default: the plan's) into the live weights; returns the re-merged blocks."""
        return self.engine.apply(params if params is not None else self.plan.params)

    def render(self, jobs: Sequence[RenderJob]) -> list[RenderedImage]:
        """Every job's image with the weights as last applied, in the order of ``jobs``."""
        return self.renderer.render(jobs)
