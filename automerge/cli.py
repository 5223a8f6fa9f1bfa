"""The ``automerge`` command: thin — parse, load config, call, exit code.

Every ``AutomergeError`` is printed as one line (``error: …``) with exit code 2; ``--debug`` shows the
traceback. Heavy libraries (torch, diffusers, optuna) are imported inside the commands so that
``automerge --help`` is instant.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from automerge.errors import AutomergeError, ConfigError, StudyError

if TYPE_CHECKING:
    import optuna

    from automerge.study import StudyFile

M = TypeVar("M", bound=BaseModel)

PROCESS_DEFAULTS: Mapping[str, str] = {"GOMP_SPINCOUNT": "10000"}
"""Environment the command sets before torch loads, unless the user set it. ``GOMP_SPINCOUNT``: how
long torch's idle OpenMP workers spin before they sleep (libgomp's default is 300,000 spins). An export
runs its C kernel on threads of its own, and the workers spinning after each torch op between keys
took ~10 % of the CPU from it: 3 real-size SD1 sources, DELLA, 17.5–20.4 → 14.2–18.0 s; the CPU demo
study unchanged (BENCHMARKS.md, many models, thirteenth session)."""

app = typer.Typer(
    name="automerge",
    help="Bayesian block-weight optimizer for Stable Diffusion checkpoint merges.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
rewards_app = typer.Typer(help="Reward-model manifests: fetch weights.", no_args_is_help=True)
app.add_typer(rewards_app, name="rewards")

console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    _state["debug"] = debug
    logging.getLogger("automerge").setLevel(logging.DEBUG if debug else logging.NOTSET)


# -- checkpoints -----------------------------------------------------------------------------------


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="A .safetensors / .ckpt file or a diffusers folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Family, layout, dtypes, parameters per MBW block and unmerged keys (reads headers only)."""
    from automerge.checkpoints import open_model, summarize

    with open_model(path) as model:
        summary = summarize(model)
    if as_json:
        print(json.dumps(summary.to_json(), indent=2))
        return
    table = Table(title=f"{path.name}: {summary.title} ({summary.layout} layout)")
    table.add_column("block")
    table.add_column("tensors", justify="right")
    table.add_column("parameters", justify="right")
    for name, block in summary.blocks.items():
        table.add_row(name, str(block.tensors), f"{block.params:,}")
    table.add_row("(unmerged)", str(len(summary.unmerged)), "copied from model A", style="dim")
    console.print(table)
    dtypes = ", ".join(f"{name} ×{count}" for name, count in summary.dtypes.items())
    console.print(f"parameters: {summary.params:,}   dtypes: {dtypes}   EMA tensors: {summary.ema}")
    if summary.unmerged:
        console.print("unmerged: " + ", ".join(summary.unmerged), style="dim", soft_wrap=True)


@app.command()
def tiny(
    family: Annotated[str, typer.Argument(help="sd1 | sd2 | sdxl")],
    out: Annotated[Path, typer.Argument(help="Output .safetensors path.")],
    seed: Annotated[int, typer.Option(help="Random-init seed.")] = 0,
    like: Annotated[Path | None, typer.Option(help="Make a fine-tune of this tiny model.")] = None,
    delta: Annotated[
        float, typer.Option(help="With --like: noise scale relative to each tensor's std.")
    ] = 0.05,
    dtype: Annotated[str, typer.Option(help="fp16 | bf16 | fp32")] = "fp16",
) -> None:
    """Write a deterministic tiny checkpoint with the real key layout of a family (a few MB)."""
    from automerge.tiny import write_tiny

    path = write_tiny(family, out, seed=seed, like=like, delta=delta, dtype=dtype)
    console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


# -- merging ---------------------------------------------------------------------------------------


@app.command()
def merge(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML: models, method, params, seed, dtype.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output .safetensors path.")],
    dtype: Annotated[str | None, typer.Option(help="fp16 | bf16 | fp32 (default: the recipe's).")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda: where the math runs.")] = "cpu",
) -> None:
    """Merge a recipe into a checkpoint, streamed key by key (A1111/ComfyUI load it as is).

    A merge that was killed or interrupted continues where it stopped when run again."""
    from automerge.commands import MergeProgress
    from automerge.dtypes import torch_dtype
    from automerge.merge import export_merge, load_recipe, plan_merge

    out_dtype = None if dtype is None else torch_dtype(dtype, where="--dtype")
    if out.suffix != ".safetensors":
        raise ConfigError(f"-o {out}: the output must be a .safetensors file")
    plan = plan_merge(load_recipe(recipe), source=str(recipe))
    try:
        label = f"merging {plan.method.name} of {len(plan.sources)} models"
        with MergeProgress(console, label=label) as progress:
            export_merge(plan, out, dtype=out_dtype, device=device, progress=progress, notify=progress.notify)
    finally:
        plan.close()
    console.print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {plan.arch.title})")


@app.command()
def methods() -> None:
    """List the merge methods with their formulas and parameters."""
    from automerge.merge import METHODS

    table = Table(title="merge methods")
    for column in ("method", "formula", "parameters", "models"):
        table.add_column(column)
    for name, method in METHODS.items():
        params = ", ".join(
            f"{p.name}={p.default:g} {p.range_text()}" for p in method.params if p.default is not None
        )
        count = f"{method.min_models}+" if method.max_models is None else str(method.max_models)
        table.add_row(name, method.formula, params, count + (" + base c" if method.needs_base else ""))
    console.print(table)


@app.command("extract-lora")
def extract_lora(
    a: Annotated[Path, typer.Argument(help="Model A (the base): a checkpoint or a diffusers folder.")],
    b: Annotated[Path, typer.Argument(help="Model B (the fine-tune) of the same family.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output LoRA (.safetensors, kohya format).")],
    rank: Annotated[int, typer.Option(help="LoRA rank (dim) per layer; alpha = rank.")] = 32,
    blocks: Annotated[
        list[str] | None, typer.Option(help="Only these MBW blocks, e.g. IN04,OUT05 (BASE: text encoders).")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda: where the SVDs run.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="fp16 | bf16 | fp32: the LoRA's tensors.")] = "fp16",
) -> None:
    """The difference B − A as a kohya LoRA (truncated SVD per layer); prints the energy kept per block."""
    from automerge.commands import extract_lora_command

    chosen = None if blocks is None else [name.strip() for item in blocks for name in item.split(",")]
    extract_lora_command(a, b, out, rank=rank, blocks=chosen, device=device, dtype=dtype, console=console)


# -- rendering and scoring ----------------------------------------------------------------------------


@app.command()
def render(
    model: Annotated[
        Path, typer.Argument(help="A checkpoint, a diffusers folder, or a merge recipe (.yaml).")
    ],
    payload: Annotated[Path, typer.Argument(help="Payload YAML.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Folder for the PNGs.")],
    device: Annotated[str | None, typer.Option(help="auto (a GPU if there is one) | cpu | cuda.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per batch, 1 to 64 (default 4).")] = None,
) -> None:
    """Render a payload with a checkpoint or a recipe (merged in memory, no file): look before you optimize."""
    from automerge.commands import render_command
    from automerge.render import RenderConfig

    config = _from_options(RenderConfig, device=device, batch_size=batch_size)
    paths = render_command(model, payload, out, config=config, console=console)
    console.print(f"wrote {len(paths)} images to {out}/")


@app.command()
def score(
    reward: Annotated[str, typer.Argument(help="A reward manifest: a name (rewards/NAME.yaml) or a path.")],
    folder: Annotated[Path, typer.Argument(help="Folder of PNGs written by `automerge render`.")],
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
    device: Annotated[str | None, typer.Option(help="Override the manifest's device.")] = None,
) -> None:
    """Score a folder of rendered PNGs (prompts read from their text chunks)."""
    from automerge.rewards import dumps_scores, find_manifest, score_folder

    manifest = find_manifest(reward)
    scores = score_folder(manifest, folder, device=device)
    if as_json:
        print(dumps_scores(scores))
        return
    table = Table(title=f"{manifest.name} on {folder}")
    for column in ("image", "score", "prompt"):
        table.add_column(column)
    for item in scores:
        table.add_row(item.key, f"{item.score:.6g}", item.prompt[:60])
    console.print(table)
    console.print(f"mean: {sum(s.score for s in scores) / len(scores):.6g} over {len(scores)} images")


@rewards_app.command("fetch")
def rewards_fetch(
    name: Annotated[str, typer.Argument(help="A manifest name (rewards/NAME.yaml) or path.")],
) -> None:
    """Download a reward manifest's weights from the hub (needs a network) and verify sha256."""
    from automerge.rewards import fetch_reward_weights, find_manifest

    for path in fetch_reward_weights(find_manifest(name)):
        console.print(f"ok {path}")


# -- studies -----------------------------------------------------------------------------------------


StorageOption = Annotated[
    str | None,
    typer.Option(
        help="The study's storage, instead of the file's: sqlite:///F.db, postgresql+psycopg://…, journal:F."
    ),
]


def _study_file(study: Path, storage: str | None) -> StudyFile:
    """The study file, its ``storage`` replaced by ``--storage`` when given."""
    from automerge.study import load_study_file

    study_file = load_study_file(study)
    return study_file if storage is None else study_file.model_copy(update={"storage": storage})


@app.command()
def optimize(
    study: Annotated[Path, typer.Argument(help="Study YAML (studies/*.yaml).")],
    trials: Annotated[
        int | None, typer.Option(help="Run N more trials now, ignoring the budget and early stopping.")
    ] = None,
    timeout: Annotated[
        str | None, typer.Option(help="Stop starting trials after this long (8h, 90m).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="Override the study's render.device.")] = None,
    storage: StorageOption = None,
    gpus: Annotated[
        str | None, typer.Option(help="One worker process per local GPU, e.g. 0,1,2; one export at the end.")
    ] = None,
    workers: Annotated[int, typer.Option(help="Worker processes on the study's device (CPU tests).")] = 1,
    export: Annotated[bool, typer.Option(help="Export the best trial at the end.")] = True,
    dry_run: Annotated[
        bool, typer.Option(help="Check everything and print the plan (memory, images, time); run nothing.")
    ] = False,
    calibrate: Annotated[
        bool, typer.Option(help="With --dry-run: time one trial for real (loads the models).")
    ] = False,
) -> None:
    """Optimize per-block merge weights; resumes where the last run stopped; exports the best trial."""
    from automerge.study import parse_duration, run_study

    if trials is not None and trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {trials}")
    try:
        seconds = parse_duration(timeout)
    except ValueError as error:
        raise ConfigError(f"--timeout: {error}") from None
    study_file = _study_file(study, storage)  # every check of the file before any worker starts
    if calibrate and not dry_run:
        raise ConfigError("--calibrate times one trial for --dry-run; give both, or neither")
    if dry_run:
        from automerge.commands import dry_run_command

        dry_run_command(study_file, device=device, calibrate=calibrate, console=console)
        return
    devices = _worker_devices(gpus, workers, device)
    if devices is not None:
        _run_workers(
            study, study_file, devices, trials=trials, timeout=timeout, storage=storage, export=export
        )
        return
    summary = run_study(
        study_file, extra_trials=trials, timeout=seconds, console=console, device=device, export=export
    )
    if summary.front:
        shown = ", ".join(map(str, summary.front))
        console.print(
            f"Pareto front: {len(summary.front)} trials ({shown}); knee point: trial {summary.best_trial}"
        )
    elif summary.best_trial is not None:
        console.print(f"best trial {summary.best_trial}: {summary.best_value:.6g}")
    if summary.interrupted:
        sys.exit(130)


def _worker_devices(gpus: str | None, workers: int, device: str | None) -> list[str | None] | None:
    """The device of each worker process to start (a GPU index, or None for the study's device), or
    None for a run in this process."""
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if gpus is None:
        return [None] * workers if workers > 1 else None
    if workers != 1 or device is not None:
        raise ConfigError("--gpus starts one worker per GPU on cuda; give it without --workers and --device")
    indices = [item.strip() for item in gpus.split(",")]
    if not all(item.isdigit() for item in indices) or len(set(indices)) != len(indices):
        raise ConfigError(f"--gpus: '{gpus}' is not a list of distinct GPU indices like 0,1,2")
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(f"--gpus {gpus}: no CUDA GPU is available; use --workers N for workers on the CPU")
    missing = [index for index in indices if int(index) >= count]
    if missing:
        raise ConfigError(f"--gpus {gpus}: this machine has {count} CUDA GPU(s), numbered 0 to {count - 1}")
    return list(indices)


def _run_workers(
    study: Path,
    study_file: StudyFile,
    devices: list[str | None],
    *,
    trials: int | None,
    timeout: str | None,
    storage: str | None,
    export: bool,
) -> None:
    """Start the workers, wait for them, then export the best trial once."""
    from automerge.commands import launch_workers
    from automerge.study import best_trial, export_study, find_study
    from automerge.study.records import front_trials, multi_objective

    worker_args = [
        f"--{name}={value}"
        for name, value in (("trials", trials), ("timeout", timeout), ("storage", storage))
        if value is not None
    ]
    codes = launch_workers(study, devices=devices, worker_args=worker_args, console=console)
    for index, code in enumerate(codes):
        if code != 0:
            err_console.print(
                f"worker {index} exited with code {code}; see {study.stem}-worker{index}.log", highlight=False
            )
    stored = find_study(study_file)
    if stored is not None and multi_objective(stored):
        done = bool(front_trials(stored))
    else:
        done = stored is not None and best_trial(stored.trials) is not None
    if export and stored is not None and done:
        export_study(study_file, study=stored, console=console)
    if any(code != 0 for code in codes):
        sys.exit(130 if 130 in codes else max(codes))


def _export_recipe(
    study_file: StudyFile, stored: optuna.Study, output_format: str, *, trial: int, out: Path | None
) -> None:
    """``export --format supermerger`` prints; ``--format mecha`` writes NAME-trialN.mecha (sd-mecha's
    reader refuses the empty last line a printed file would end with); ``--format comfyui`` writes
    NAME-trialN.comfyui-api.json and NAME-trialN.comfyui-workflow.json."""
    from automerge.files import writable_folder, write_text_atomic
    from automerge.study import export_dir, interop_text

    if output_format == "comfyui":
        _export_comfyui(study_file, stored, trial=trial, out=out)
        return
    text = interop_text(study_file, output_format, study=stored, trial_number=trial)
    if output_format == "supermerger":
        sys.stdout.write(text)
        return
    folder = writable_folder(out or export_dir(study_file), fix="pass another folder with -o DIR")
    path = folder / f"{study_file.name}-trial{trial}.mecha"
    write_text_atomic(path, text)
    console.print(f"wrote {path} (sd-mecha: sd_mecha.deserialize_path, then sd_mecha.merge)", highlight=False)


def _export_comfyui(study_file: StudyFile, stored: optuna.Study, *, trial: int, out: Path | None) -> None:
    """The trial as a ComfyUI workflow, both forms, and how to run them."""
    from automerge.files import writable_folder, write_text_atomic
    from automerge.study import export_dir, interop_workflow

    workflow = interop_workflow(study_file, study=stored, trial_number=trial)  # checked before writing
    folder = writable_folder(out or export_dir(study_file), fix="pass another folder with -o DIR")
    stem = f"{study_file.name}-trial{trial}"
    graph, api = folder / f"{stem}.comfyui-workflow.json", folder / f"{stem}.comfyui-api.json"
    write_text_atomic(graph, workflow.graph_json())
    write_text_atomic(api, workflow.api_json())
    for line in (
        f"wrote {graph} (ComfyUI's UI: drag it onto the canvas, then Queue)",
        f'wrote {api} (ComfyUI\'s API: POST {{"prompt": <its contents>}} to http://127.0.0.1:8188/prompt)',
        f"both load {', '.join(workflow.checkpoints)} from ComfyUI's models/checkpoints/ (copy or link them "
        f"there) and save output/checkpoints/{stem}_00001_.safetensors",
        *([f"and {', '.join(workflow.loras)} from models/loras/"] if workflow.loras else []),
        "where ComfyUI's result differs from automerge's: the workflow's Note node",
    ):
        console.print(line, highlight=False, soft_wrap=True)


@app.command()
def export(
    study: Annotated[Path, typer.Argument(help="Study YAML.")],
    trial: Annotated[int | None, typer.Option(help="Trial number (default: the best).")] = None,
    out: Annotated[Path | None, typer.Option("-o", "--out", help="Output folder.")] = None,
    storage: StorageOption = None,
    pick: Annotated[
        str | None,
        typer.Option(
            help="Several objectives: which Pareto-front trial to export when --trial is not given: knee "
            "(the default: nearest the ideal point) or weighted:W1,W2,… (the highest weighted sum of the "
            "objectives, each normalised by the front's range).",
        ),
    ] = None,
    output_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="automerge: recipe.yaml, model.safetensors, report.html; supermerger: print its mode, "
            "calcmode and MBW weights; mecha: write an sd-mecha recipe (NAME-trialN.mecha) in the folder; "
            "comfyui: write a ComfyUI workflow (NAME-trialN.comfyui-workflow.json, and the API form "
            "NAME-trialN.comfyui-api.json) in the folder.",
        ),
    ] = "automerge",
) -> None:
    """Write recipe.yaml, model.safetensors and report.html for the best (or a given) trial; with
    several objectives, for a Pareto-front trial picked by --pick (default: the knee point)."""
    from automerge.interop import FORMATS
    from automerge.study import choose_trial, default_storage, find_study
    from automerge.study.pareto import KNEE, parse_pick
    from automerge.study.records import multi_objective, pick_trial

    if output_format not in ("automerge", *FORMATS):
        raise ConfigError(f"--format: '{output_format}' is not a format; use automerge, {', '.join(FORMATS)}")
    rule = parse_pick(pick) if pick is not None else None
    study_file = _study_file(study, storage)
    stored = find_study(study_file)
    if stored is None:
        raise StudyError(
            f"{study}: no study '{study_file.name}' in {default_storage(study_file)}; "
            f"run automerge optimize {study} first (or set storage: to where it lives)"
        )
    # a wrong --trial or --pick is said before the render stack loads
    chosen = choose_trial(stored, trial, pick=rule)
    if output_format != "automerge":
        if multi_objective(stored) and trial is None:  # the recipe itself may go to stdout
            err_console.print(pick_trial(stored, rule or KNEE).reason, highlight=False)
        _export_recipe(study_file, stored, output_format, trial=chosen.number, out=out)
        return
    from automerge.study import export_study

    export_study(study_file, study=stored, trial_number=trial, out_dir=out, console=console, pick=rule)


@app.command()
def dashboard(
    study: Annotated[Path, typer.Argument(help="Study YAML.")],
    port: Annotated[int, typer.Option(help="Port.")] = 8080,
    host: Annotated[str, typer.Option(help="Bind address (default: this machine only).")] = "127.0.0.1",
    log_requests: Annotated[bool, typer.Option(help="Print every HTTP request.")] = False,
) -> None:
    """Serve optuna-dashboard on the study's storage, with each trial's images."""
    from automerge.commands import serve_dashboard

    serve_dashboard(study, host=host, port=port, console=console, log_requests=log_requests)


def _from_options(model: type[M], **options: object) -> M:
    """``model`` built from the command-line options that were given (None: not given, the model's
    default applies), so the model's checks are the options' checks: one default and one range per
    setting. An error names the option, e.g. ``--batch-size``."""
    try:
        return model(**{name: value for name, value in options.items() if value is not None})
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        option = "--" + str(first["loc"][0]).replace("_", "-")
        message = first["msg"].removeprefix("Value error, ")
        got = "" if repr(first.get("input")) in message else f"; got {first.get('input')!r}"
        raise ConfigError(f"{option}: {message}{got}") from None


def main() -> None:
    """Entry point: run the app, turning user errors into one line and exit code 2."""
    for name, value in PROCESS_DEFAULTS.items():
        os.environ.setdefault(name, value)
    try:
        code = app(standalone_mode=False)  # click returns, not raises, the exit code of Ctrl-C (130)
    except AutomergeError as error:
        if _state["debug"]:
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except Exception as error:
        if _is_usage_error(error):
            error.show()  # type: ignore[attr-defined]
            sys.exit(error.exit_code)  # type: ignore[attr-defined]
        raise
    if code == 130:
        err_console.print("interrupted")
        sys.exit(130)
    if isinstance(code, int) and code:
        sys.exit(code)


def _is_usage_error(error: Exception) -> bool:
    """A click-style usage error (unknown option, bad value, missing argument), which carries its
    message and exit code. Matched by shape: recent typer raises its own vendored copy of click's
    exception classes, older typer raises click's."""
    return callable(getattr(error, "show", None)) and isinstance(getattr(error, "exit_code", None), int)


if __name__ == "__main__":
    main()
