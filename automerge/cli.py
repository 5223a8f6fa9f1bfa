"""The ``automerge`` command: thin — parse, load config, call, exit code.

Every ``AutomergeError`` is printed as one line (``error: …``) with exit code 2; ``--debug`` shows the
traceback. Heavy libraries (torch, diffusers, optuna) are imported inside the commands so that
``automerge --help`` is instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from automerge.errors import AutomergeError, ConfigError

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


# -- checkpoints -----------------------------------------------------------------------------------


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="A .safetensors / .ckpt file or a diffusers folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Family, layout, dtypes, parameters per MBW block and unmerged keys (reads headers only)."""
    from automerge.checkpoints.model import open_model
    from automerge.checkpoints.summary import summarize

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
    like: Annotated[Optional[Path], typer.Option(help="Make a fine-tune of this tiny model.")] = None,  # noqa: UP045
    delta: Annotated[
        float, typer.Option(help="With --like: noise scale relative to each tensor's std.")
    ] = 0.05,
    dtype: Annotated[str, typer.Option(help="fp16 | bf16 | fp32")] = "fp16",
) -> None:
    """Write a deterministic tiny checkpoint with the real key layout of a family (a few MB)."""
    from automerge.testing.tiny import write_tiny

    path = write_tiny(family, out, seed=seed, like=like, delta=delta, dtype=dtype)
    console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


# -- merging ---------------------------------------------------------------------------------------


@app.command()
def merge(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML: models, method, params, seed, dtype.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output .safetensors path.")],
    dtype: Annotated[Optional[str], typer.Option(help="fp16 | bf16 | fp32 (default: the recipe's).")] = None,  # noqa: UP045
    device: Annotated[str, typer.Option(help="cpu | cuda: where the math runs.")] = "cpu",
) -> None:
    """Merge a recipe into a checkpoint, streamed key by key (A1111/ComfyUI load it as is)."""
    from automerge.merge.export import export_merge
    from automerge.merge.recipe import DTYPES, load_recipe, plan_merge

    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    if out.suffix != ".safetensors":
        raise ConfigError(f"-o {out}: the output must be a .safetensors file")
    parsed = load_recipe(recipe)
    plan = plan_merge(parsed, source=str(recipe))
    try:
        with console.status(f"merging {plan.method.name} of {len(plan.sources)} models"):
            export_merge(plan, out, dtype=dtype, device=device)
    finally:
        plan.close()
    console.print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {plan.arch.title})")


@app.command()
def methods() -> None:
    """List the merge methods with their formulas and parameters."""
    from automerge.merge.methods import METHODS

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


def main() -> None:
    """Entry point: run the app, turning user errors into one line and exit code 2."""
    try:
        app(standalone_mode=False)
    except AutomergeError as error:
        if _state["debug"]:
            raise
        err_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except Exception as error:  # click usage errors carry their own exit code
        import click

        if isinstance(error, click.exceptions.ClickException):
            error.show()
            sys.exit(error.exit_code)
        raise


if __name__ == "__main__":
    main()
