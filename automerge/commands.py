"""The bodies of the CLI commands that need more than one call (kept out of cli.py, which stays thin)."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from automerge.errors import ConfigError
from automerge.files import check_creatable, writable_folder
from automerge.terminal import startup_status

if TYPE_CHECKING:
    from automerge.arch import Architecture
    from automerge.lora import Extraction
    from automerge.render import RenderConfig
    from automerge.study import StudyFile


def render_command(
    model: Path, payload_path: Path, out: Path, *, config: RenderConfig, console: Console | None = None
) -> list[Path]:
    """Render a payload with a checkpoint (as itself) or a recipe merged in memory; the PNGs' paths."""
    from automerge.merge import load_recipe, plan_checkpoint, plan_merge
    from automerge.render import RenderSession, load_payload, save_png

    payload = load_payload(payload_path)
    config.torch_device(where="--device")
    fix = "pass another folder with -o DIR"
    check_creatable(out, fix=fix)  # created only once the model is known to render
    is_recipe = model.suffix in (".yaml", ".yml")
    plan = plan_merge(load_recipe(model), source=str(model)) if is_recipe else plan_checkpoint(model)
    try:
        with startup_status(console or Console()) as status:
            session = RenderSession(plan, config, status=status)
            status("merging" if is_recipe else "loading the weights")
            session.apply()
            writable_folder(out, fix=fix)
            jobs = payload.jobs()
            status(f"rendering {len(jobs)} images ({payload_path.name})")
            return [save_png(image, out) for image in session.render(jobs)]
    finally:
        plan.close()


class MergeProgress:
    """What ``automerge merge`` shows while it writes: on a terminal, one live line (keys n/N, bar,
    bytes, ETA from the bytes merged by this run: a resumed merge's earlier keys do not count toward
    the rate); everywhere, the export's notices (resuming, discarded) and, when interrupted, how to
    resume. Pass it as ``export_merge``'s ``progress`` and its ``notify`` as ``notify``."""

    def __init__(self, console: Console, *, label: str) -> None:
        self.console = console
        self.done_keys = self.total_keys = 0
        self._live = console.is_terminal
        self._progress = Progress(
            TextColumn(label),
            TextColumn("{task.fields[keys]}"),
            BarColumn(bar_width=16),
            DownloadColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(compact=True),
            console=console,
            transient=True,
        )
        self._task = self._progress.add_task("merge", total=None, keys="", start=False)

    def __enter__(self) -> Self:
        if self._live:
            self._progress.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._live:
            self._progress.__exit__(exc_type, exc, traceback)
        if exc_type is KeyboardInterrupt and self.done_keys:
            self.console.print(
                f"{self.done_keys} of {self.total_keys} keys merged are kept: run the same command "
                "again to resume",
                highlight=False,
            )

    def __call__(self, done_keys: int, total_keys: int, done_bytes: int, total_bytes: int) -> None:
        keys = f"{done_keys}/{total_keys} keys"
        if not self.total_keys:  # the first call: what a resumed merge found already written is no rate
            self._progress.reset(self._task, total=total_bytes, completed=done_bytes, keys=keys)
        else:
            self._progress.update(self._task, completed=done_bytes, keys=keys)
        self.done_keys, self.total_keys = done_keys, total_keys

    def notify(self, line: str) -> None:
        self.console.print(line, highlight=False)


def serve_dashboard(
    study_path: Path, *, host: str, port: int, console: Console, log_requests: bool = False
) -> None:
    """optuna-dashboard on the study's storage, with the trials' images from its artifact store.
    The study, the storage and the address are checked before anything is created or printed; HTTP
    requests are logged only with ``log_requests`` (optuna-dashboard's own server printed every one)."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    import optuna_dashboard
    from optuna.artifacts import FileSystemArtifactStore

    from automerge.errors import StudyError
    from automerge.study import artifact_dir, default_storage, load_study_file
    from automerge.study.storage import open_storage, storage_exists

    study = load_study_file(study_path)
    url = default_storage(study)
    if not storage_exists(url):
        raise StudyError(
            f"{study_path}: no study is stored at {url} yet; run `automerge optimize {study_path}` first"
        )
    check_listen_address(host, port)
    storage = open_storage(url)
    store_dir = writable_folder(artifact_dir(study), fix="check the permissions of the study file's folder")
    app = optuna_dashboard.wsgi(storage, artifact_store=FileSystemArtifactStore(str(store_dir)))

    class RequestHandler(WSGIRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
            if log_requests:
                super().log_message(format, *args)

    with make_server(host, port, app, handler_class=RequestHandler) as server:
        console.print(f"optuna-dashboard on http://{host}:{port}/ (storage {url}); Ctrl+C stops it")
        console.print(
            "[yellow]note:[/] the dashboard writes to the study: its upload and delete buttons add or remove "
            "trial images in the artifact store, and notes and trial marks are saved in the storage",
            highlight=False,
        )
        server.serve_forever()


def check_listen_address(host: str, port: int) -> None:
    """``ConfigError`` naming ``--host`` or ``--port`` when a server could not listen there: a port
    out of range, in use or privileged, a name that does not resolve, an address not of this machine."""
    import errno
    import socket

    if not 1 <= port <= 65535:
        raise ConfigError(f"--port {port}: a port is a number from 1 to 65535; try 8080")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise ConfigError(
            f"--host {host}: not an address ({reason}); use 127.0.0.1, or 0.0.0.0 for every network"
        ) from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ConfigError(f"--port {port}: already in use on {host}; pass another --port") from None
            if error.errno == errno.EACCES:
                raise ConfigError(
                    f"--port {port}: needs administrator rights; use a port above 1023"
                ) from None
            if error.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(
                    f"--host {host}: not an address of this machine; use 127.0.0.1, or 0.0.0.0 for every network"
                ) from None
            raise ConfigError(
                f"--host {host} --port {port}: cannot listen there ({error.strerror or error})"
            ) from None


def launch_workers(
    study_path: Path,
    *,
    devices: list[str | None],
    worker_args: list[str],
    console: Console,
) -> list[int]:
    """One ``automerge optimize --no-export`` process per entry of ``devices`` on the same study (a
    GPU index: the worker sees only that GPU, as cuda:0; None: the study's own device), each logging to
    ``<study stem>-worker<i>.log`` beside the study file; waits for all and returns their exit codes.
    Ctrl-C reaches the workers too (one process group): each marks its running trial interrupted.
    SIGTERM sent to this process alone is forwarded to every live worker (no orphans left running)."""
    import os
    import signal
    import subprocess
    import sys

    processes: list[subprocess.Popen[bytes]] = []

    def forward(signum: int, frame: object) -> None:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)  # the CLI's main thread
    try:
        for index, gpu in enumerate(devices):
            log = study_path.parent / f"{study_path.stem}-worker{index}.log"
            env = dict(os.environ)
            args = [
                sys.executable,
                "-m",
                "automerge",
                "optimize",
                str(study_path),
                "--no-export",
                *worker_args,
            ]
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
                args += ["--device", "cuda:0"]
            with log.open("w") as output:
                processes.append(subprocess.Popen(args, env=env, stdout=output, stderr=subprocess.STDOUT))
            where = f"GPU {gpu}" if gpu is not None else "the study's device"
            console.print(f"worker {index} on {where}: log {log}", highlight=False)
        while True:
            try:
                return [process.wait() for process in processes]
            except KeyboardInterrupt:  # the workers got the same Ctrl-C: wait while they save their trials
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)


def _gib(count: int) -> str:
    """Bytes as GiB, with three decimals below 1 GiB (tiny models)."""
    return f"{count / 2**30:.3f}" if count < 2**30 else f"{count / 2**30:.2f}"


def dry_run_command(study_file: StudyFile, *, device: str | None, calibrate: bool, console: Console) -> None:
    """The plan of a study, checked from headers; exit 2 when it cannot fit, with the setting to change."""
    from automerge.study.dry_run import dry_run

    plan = dry_run(study_file, device=device, calibrate=calibrate)
    console.print(
        f"[bold]{escape(str(study_file.path))}[/]: {plan.family} {plan.method}, device {plan.device}"
    )
    console.print(f"blocks merged: {len(plan.blocks)} ({', '.join(plan.blocks)})", highlight=False)
    console.print(
        f"search dimensions: {len(plan.dimensions)} ({', '.join(plan.dimensions)})", highlight=False
    )
    console.print(f"images per trial: {plan.images_per_trial}; trials: {plan.trials}")
    table = Table(title="memory plan", title_justify="left")
    for column in ("resident", "where", "GiB"):
        table.add_column(column, justify="right" if column == "GiB" else "left")
    for item in plan.memory:
        table.add_row(item.name, item.where, _gib(item.bytes) if item.bytes else "?")
    for where, free in (("device", plan.free_device_bytes), ("host", plan.free_host_bytes)):
        if plan.total(where) or where == "device":
            shown = "?" if free is None else f"{_gib(free)} GiB"
            table.add_row(f"[bold]total on {where}[/] (free {shown})", where, _gib(plan.total(where)))
    console.print(table)
    if plan.seconds_per_trial is None:
        console.print("time: unknown (run with --calibrate to time one trial; it loads the models)")
    else:
        hours = plan.seconds_per_trial * plan.trials / 3600
        console.print(
            f"time: {plan.seconds_per_trial:.2f} s per trial ({plan.timing_source}); "
            f"{plan.trials} trials ≈ {hours:.2f} h"
        )
    if not plan.fits:
        raise ConfigError(f"{study_file.path}: {plan.problems[0]}")
    console.print("[green]the plan fits[/]")


def _svd_device(device: str) -> str:
    """``--device`` checked: cpu, or cuda[:N] where a GPU is there."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device: '{device}' is not a device; use cpu or cuda") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device: '{device}' is not supported; use cpu or cuda")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA GPU is available; use --device cpu")
    return str(parsed)


def _kept_energy_table(extraction: Extraction, arch: Architecture, *, rank: int) -> Table:
    """Per block: its layers and the share of B − A's energy they keep (Σσ² kept / Σσ²)."""
    import torch

    counts: dict[str, int] = {}
    for layer in extraction.layers:
        block = str(arch.block_of(layer.key, torch.float32))
        counts[block] = counts.get(block, 0) + 1
    table = Table(title=f"B − A at rank {rank}", title_justify="left")
    for column in ("block", "layers", "energy kept (Σσ² kept / Σσ²)"):
        table.add_column(column, justify="left" if column == "block" else "right")
    for block, kept in extraction.kept_energy.items():
        table.add_row(block, str(counts.get(block, 0)), f"{100 * kept:.2f} %")
    return table


def extract_lora_command(
    a: Path,
    b: Path,
    out: Path,
    *,
    rank: int,
    blocks: list[str] | None,
    device: str,
    dtype: str,
    console: Console,
) -> None:
    """``automerge extract-lora``: B − A as a kohya LoRA; every option and both headers are checked
    before the first SVD; prints the energy kept per block."""
    import json

    from automerge.checkpoints import open_model
    from automerge.dtypes import torch_dtype
    from automerge.lora import extract_lora, write_kohya_lora
    from automerge.registry import did_you_mean

    # 1. The options, then the two models (headers only).
    if rank < 1:
        raise ConfigError(f"--rank must be at least 1, got {rank}")
    out_dtype = torch_dtype(dtype, where="--dtype")
    if out.suffix != ".safetensors":
        raise ConfigError(f"-o {out}: the LoRA must be a .safetensors file")
    fix = "pass another path with -o"
    check_creatable(out.parent, fix=fix)
    for source in (a, b):
        if out.exists() and source.exists() and out.samefile(source):
            raise ConfigError(f"-o {out}: is the model {source} itself; write the LoRA to another path")
    svd_device = _svd_device(device)
    with open_model(a) as model_a, open_model(b) as model_b:
        arch = model_a.arch
        if model_b.arch.name != arch.name:
            raise ConfigError(
                f"{a} is {arch.title} but {b} is {model_b.arch.title}; "
                "a difference LoRA needs two models of one family"
            )
        for block in blocks or ():
            if block not in arch.merge_blocks:
                raise ConfigError(
                    f"--blocks: '{block}' is not a block of {arch.title}{did_you_mean(block, arch.merge_blocks)}; "
                    f"blocks: {', '.join(arch.merge_blocks)}"
                )
        # 2. One truncated SVD per layer.
        with console.status("extracting B − A") as spinner:
            extraction = extract_lora(
                model_a.checkpoint,
                model_b.checkpoint,
                arch,
                rank=rank,
                blocks=blocks,
                device=svd_device,
                dtype=out_dtype,
                progress=lambda done, total: spinner.update(f"extracting B − A: {done}/{total} tensors"),
            )
    if not extraction.layers:
        raise ConfigError(
            f"{a} and {b} are identical in the chosen blocks: there is no difference to extract"
        )
    # 3. The file (kohya's metadata + where it came from), then the kept energy per block.
    note = {
        "a": a.name,
        "b": b.name,
        "rank": rank,
        "blocks": blocks or "all",
        "kept_energy": extraction.kept_energy,
    }
    metadata = {
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(rank)),
        "ss_network_args": json.dumps({"conv_dim": str(rank), "conv_alpha": str(float(rank))}),
        "automerge.extract_lora": json.dumps(note, sort_keys=True),
    }
    writable_folder(out.parent, fix=fix)
    write_kohya_lora(out, extraction.layers, arch, metadata=metadata)
    console.print(_kept_energy_table(extraction, arch, rank=rank))
    size = out.stat().st_size / 1e6
    console.print(
        f"wrote {out} ({len(extraction.layers)} layers, {size:.1f} MB, {arch.title})", highlight=False
    )
