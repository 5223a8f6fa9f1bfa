"""Reward weight files: existence checks with the fix in the message, streaming sha256 checks,
safe state-dict reading (``torch.load(weights_only=True)``) and the one networked step, ``fetch``.

A file the manifest gives no sha256 for is pinned at its first fetch: ``<file>.sha256`` beside it, in
``sha256sum`` format, checked on every later load (trust on first download, as SSH's known_hosts).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from automerge.checkpoints import cached_sha256, sha256_file
from automerge.errors import RewardError
from automerge.files import write_text_atomic
from automerge.rewards.base import WeightRole
from automerge.rewards.manifest import HubSource, RewardManifest, weight_roles


def _where_from(manifest: RewardManifest, role: WeightRole, manifest_path: Path) -> str:
    """How to get the weights of ``role``: the fetch command and the hub repo, when the manifest has one."""
    source = manifest.hub.get(role.name)
    name = manifest_path.stem
    if source is None:
        return f"put {role.what} there"
    files = ", ".join(source.files)
    return (
        f"run `automerge rewards fetch {name}` online, or put {files} (from the hub repo {source.repo}) there"
    )


def resolve_weights(manifest: RewardManifest, manifest_path: Path) -> dict[str, Path]:
    """The manifest's weight paths after checking each exists, has the right kind (file or folder),
    and matches its sha256 (streamed). Raises ``RewardError`` naming the role, the path and the fix."""
    roles = {role.name: role for role in weight_roles(manifest.reward)}
    for role, path in manifest.weights.items():
        _check_exists(roles[role], path, manifest=manifest, manifest_path=manifest_path)
    for key, expected in manifest.sha256.items():
        role, _, inner = key.partition("/")
        verify_sha256(manifest.weights[role] / inner if inner else manifest.weights[role], expected, key=key)
    for key, path in _pinnable_files(manifest):
        if key not in manifest.sha256:
            verify_pin(path)
    return dict(manifest.weights)


def _pinnable_files(manifest: RewardManifest) -> list[tuple[str, Path]]:
    """(sha256 key, path) of every file the manifest names: file roles, and the hub files of folders."""
    roles = {role.name: role for role in weight_roles(manifest.reward)}
    files = []
    for role, path in manifest.weights.items():
        if roles[role].kind == "file":
            files.append((role, path))
        elif role in manifest.hub:
            files.extend((f"{role}/{name}", path / name) for name in manifest.hub[role].files)
    return files


def pin_path(path: Path) -> Path:
    """Where the first-fetch pin of ``path`` lives: ``<file>.sha256`` beside it."""
    return path.with_name(path.name + ".sha256")


def write_pin(path: Path) -> Path:
    """Record ``path``'s sha256 beside it (``sha256sum --check`` reads it); returns the pin's path."""
    pin = pin_path(path)
    write_text_atomic(pin, f"{cached_sha256(path)}  {path.name}\n")
    return pin


def _pinned(path: Path) -> str | None:
    """The sha256 in ``path``'s first-fetch pin, or None when it has none."""
    pin = pin_path(path)
    if not pin.is_file():
        return None
    words = pin.read_text(encoding="utf-8").split()
    return words[0] if words else ""


def pin_or_verify(path: Path) -> None:
    """Pin ``path`` if it has no pin yet (first fetch), else check it still matches its pin."""
    if _pinned(path) is None:
        write_pin(path)
    else:
        verify_pin(path)


def verify_pin(path: Path) -> None:
    """When ``path`` has a first-fetch pin, raise ``RewardError`` unless the file still matches it
    (through the hash cache: a multi-GB file is hashed again only when its size or mtime changed)."""
    expected = _pinned(path)
    if expected is None:
        return
    found = cached_sha256(path)
    if found != expected:
        raise RewardError(
            f"sha256 mismatch for {path} (pinned at its first fetch in {pin_path(path)}): expected "
            f"{expected}, found {found}; the file changed since: delete it and {pin_path(path).name}, then run "
            "`automerge rewards fetch` again (or keep the new file and delete only the pin)"
        )


def _check_exists(role: WeightRole, path: Path, *, manifest: RewardManifest, manifest_path: Path) -> None:
    prefix = f"{manifest_path}: weights.{role.name}"
    if not path.exists():
        what = "folder" if role.kind == "dir" else "file"
        raise RewardError(f"{prefix}: {what} {path} not found; {_where_from(manifest, role, manifest_path)}")
    if role.kind == "dir" and not path.is_dir():
        raise RewardError(f"{prefix}: {path} is a file, expected a folder ({role.what})")
    source = manifest.hub.get(role.name)
    lacking = (
        [name for name in source.files if not (path / name).is_file()]
        if source and role.kind == "dir"
        else []
    )
    if lacking:
        raise RewardError(
            f"{prefix}: folder {path} lacks {', '.join(lacking)}; {_where_from(manifest, role, manifest_path)}"
        )
    if role.kind == "file" and not path.is_file():
        raise RewardError(f"{prefix}: {path} is a folder, expected a file ({role.what})")


def verify_sha256(path: Path, expected: str, *, key: str) -> None:
    """Raise ``RewardError`` naming the file, the expected and the found hash when they differ."""
    if not path.is_file():
        raise RewardError(f"sha256.{key}: file {path} not found")
    found = sha256_file(path)
    if found != expected:
        raise RewardError(
            f"sha256 mismatch for {path} (sha256.{key}): expected {expected}, found {found}; "
            "the file is corrupt, truncated or a different version: delete it and fetch it again"
        )


def load_state_dict(path: Path, *, what: str) -> dict[str, torch.Tensor]:
    """Read a plain tensor state dict from a ``.pt``/``.pth`` file with ``weights_only=True`` (no
    arbitrary unpickling). Any read failure becomes one ``RewardError`` line naming the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError… on bad files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RewardError(f"{path}: cannot be read as a PyTorch state dict ({what}): {reason}") from None
    if not isinstance(state, Mapping) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise RewardError(f"{path}: expected a state dict of tensors ({what}), found {type(state).__name__}")
    return dict(state)


def load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], *, path: Path) -> None:
    """``load_state_dict(strict=True)`` with a one-line ``RewardError`` listing what does not fit."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise RewardError(
            f"{path}: does not fit the model: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}"
        )
    wrong = [key for key, tensor in state.items() if tensor.shape != expected[key].shape]
    if wrong:
        key = wrong[0]
        raise RewardError(
            f"{path}: {len(wrong)} tensors have other shapes than the model, e.g. {key}: "
            f"{tuple(state[key].shape)} in the file, {tuple(expected[key].shape)} in the model; "
            "do the sizes in med_config / options.vision match the checkpoint?"
        )
    module.load_state_dict(state, strict=True)


Downloader = Callable[..., str]


def fetch_reward_weights(manifest_path: Path | str, *, downloader: Downloader | None = None) -> list[Path]:
    """Download every ``hub`` file of a manifest into its ``weights`` path and verify its sha256.

    Files already present (and matching their sha256, when given) are kept. ``downloader`` defaults
    to ``huggingface_hub.hf_hub_download``; when it fails (offline, no such file) the ``RewardError``
    says which file to put where.
    """
    from automerge.rewards.manifest import read_manifest

    manifest_path = Path(manifest_path)
    manifest = read_manifest(manifest_path)
    if not isinstance(manifest, RewardManifest):
        raise RewardError(f"{manifest_path}: a composite has nothing to fetch; fetch each member manifest")
    if not manifest.hub:
        raise RewardError(f"{manifest_path}: has no `hub` section; put the weights files there by hand")
    if downloader is None:
        from huggingface_hub import hf_hub_download  # network: only `automerge rewards fetch`

        downloader = hf_hub_download  # network: the user asked to fetch
    roles = {role.name: role for role in weight_roles(manifest.reward)}
    fetched: list[Path] = []
    failures: list[str] = []
    unreachable = False
    for role, source in manifest.hub.items():
        for name, target in _targets(roles[role], source, manifest.weights[role]):
            key = role if roles[role].kind == "file" else f"{role}/{name}"
            expected = manifest.sha256.get(key)
            if _is_current(target, expected):
                if expected is None:
                    pin_or_verify(target)  # put there by hand before: pinned as it is now
                fetched.append(target)
                continue
            if unreachable:  # each try offline costs huggingface_hub's retries (~20 s)
                failures.append(
                    f"{name} not tried (the hub was unreachable): put {name} from {source.repo} at {target}"
                )
                continue
            try:
                _download(source, name, target, downloader=downloader)
                if expected is not None:
                    verify_sha256(target, expected, key=key)
                else:  # refused if the hub now serves another file than the one trusted at first
                    pin_or_verify(target)
            except RewardError as error:  # try the others too, then name every failure at once
                failures.append(str(error))
                unreachable = isinstance(error, HubUnreachableError)
                continue
            fetched.append(target)
    if len(failures) == 1:
        raise RewardError(failures[0])
    if failures:
        total = len(failures) + len(fetched)
        raise RewardError(f"{len(failures)} of {total} files could not be fetched: " + " | ".join(failures))
    return fetched


def _targets(role: WeightRole, source: HubSource, path: Path) -> list[tuple[str, Path]]:
    """(hub file name, local path) pairs: a file role takes exactly one hub file, a folder role many."""
    if role.kind == "file":
        if len(source.files) != 1:
            raise RewardError(
                f"hub.{role.name}: '{role.name}' is one file, but the hub section lists {len(source.files)}"
            )
        return [(source.files[0], path)]
    return [(name, path / name) for name in source.files]


def _is_current(target: Path, expected: str | None) -> bool:
    """Present and matching the manifest's sha256, or else its first-fetch pin (if any)."""
    if not target.is_file():
        return False
    if expected is not None:
        return sha256_file(target) == expected
    pinned = _pinned(target)
    return pinned is None or pinned == cached_sha256(target)


class HubUnreachableError(RewardError):
    """The hub could not be reached at all (offline, DNS, timeout): no use trying other files."""


def _is_unreachable(error: Exception) -> bool:
    """A connection failure rather than a problem with one file. huggingface_hub raises
    ``LocalEntryNotFoundError`` when it cannot connect and the file is not in its cache."""
    from huggingface_hub.errors import LocalEntryNotFoundError  # network: none, only the exception class

    return isinstance(error, ConnectionError | TimeoutError | LocalEntryNotFoundError)


@contextlib.contextmanager
def _hub_logs_silenced() -> Iterator[None]:
    """huggingface_hub's warnings (retries, failed HEAD requests) off while it downloads; its errors
    reach the user as automerge's own one-line ``RewardError``."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _download(source: HubSource, name: str, target: Path, *, downloader: Downloader) -> None:
    """Download one hub file into a temporary folder beside ``target``, then move it into place."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RewardError(
            f"cannot create folder {target.parent} for {name}: {error.strerror or error}; "
            "point the manifest's weights at a writable folder"
        ) from None
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as scratch:
        try:
            # network: the only place automerge downloads reward weights (`automerge rewards fetch`)
            with _hub_logs_silenced():  # its retry warnings would precede our one-line error
                local = downloader(
                    repo_id=source.repo, filename=name, revision=source.revision, local_dir=scratch
                )
        except Exception as error:  # noqa: BLE001 - huggingface_hub raises many types: offline, HTTP, missing entry…
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise (HubUnreachableError if _is_unreachable(error) else RewardError)(
                f"cannot download {name} from the hub repo {source.repo} ({type(error).__name__}: {reason}); "
                f"when online run the fetch again, or put {name} from {source.repo} at {target}"
            ) from None
        local_path = Path(local)
        if local_path.is_symlink():  # older huggingface_hub links into its cache: copy, keep the cache intact
            shutil.copyfile(local_path, Path(scratch) / ".staged")
            local_path = Path(scratch) / ".staged"
        os.replace(local_path, target)
