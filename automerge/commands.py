"""The bodies of the CLI commands that need more than one call (kept out of cli.py, which stays thin)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from automerge.errors import ConfigError
from automerge.registry import did_you_mean


def resolve_reward_manifest(name: str) -> Path:
    """``imagereward`` → ``rewards/imagereward.yaml`` in the working directory, else the one that
    ships beside the package (a checkout); a ``.yaml`` path is taken as given."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        return path
    folders = [Path("rewards"), Path(__file__).resolve().parent.parent / "rewards"]
    for folder in folders:
        if (folder / f"{name}.yaml").is_file():
            return folder / f"{name}.yaml"
    known = sorted({p.stem for folder in folders if folder.is_dir() for p in folder.glob("*.yaml")})
    raise ConfigError(
        f"no reward manifest '{name}'{did_you_mean(name, known)}; known: {', '.join(known) or '(none)'}; "
        "or give the path of a manifest .yaml"
    )


def render_command(model: Path, payload_path: Path, out: Path, *, device: str, batch_size: int) -> list[Path]:
    """Render a payload with a checkpoint (as 'pure A') or a recipe merged in memory."""
    from automerge.config import writable_folder
    from automerge.merge.engine import EngineOptions, LiveEngine
    from automerge.merge.recipe import load_recipe, plan_merge, recipe_from_data
    from automerge.render.payload import load_payload
    from automerge.render.pipeline import build_pipeline, pipeline_modules
    from automerge.render.renderer import Renderer, save_png
    from automerge.study.runtime import resolve_device, resolve_dtype

    payload = load_payload(payload_path)
    writable_folder(out, fix="pass another folder with -o DIR")
    if model.suffix in (".yaml", ".yml"):
        recipe, source = load_recipe(model), str(model)
    else:
        data = {
            "models": {"a": str(model), "b": str(model)},
            "method": "weighted_sum",
            "params": {"alpha": 0.0},
        }
        recipe, source = recipe_from_data(data, source=str(model)), str(model)
    target = resolve_device(device)
    dtype = resolve_dtype("auto", target)
    plan = plan_merge(recipe, source=source)
    try:
        engine = LiveEngine(plan, EngineOptions(device=str(target), dtype=dtype))
        engine.apply(plan.params)
        modules = pipeline_modules(
            engine.modules, family=plan.arch.name, prediction_type=plan.arch.prediction_type
        )
        pipeline = build_pipeline(modules, device=target, dtype=dtype)
        rendered = Renderer(pipeline, batch_size=batch_size, device=target, dtype=dtype).render(
            payload.jobs()
        )
        return [save_png(image, out) for image in rendered]
    finally:
        plan.close()


def serve_dashboard(study_path: Path, *, host: str, port: int, console: Console) -> None:
    import optuna_dashboard
    from optuna.artifacts import FileSystemArtifactStore

    from automerge.config import writable_folder
    from automerge.study.config import artifact_dir, default_storage, load_study_file

    study = load_study_file(study_path)
    store_dir = writable_folder(artifact_dir(study), fix="check the permissions of the study file's folder")
    console.print(f"optuna-dashboard on http://{host}:{port}/ (storage {default_storage(study)})")
    optuna_dashboard.run_server(
        default_storage(study), host=host, port=port, artifact_store=FileSystemArtifactStore(str(store_dir))
    )
