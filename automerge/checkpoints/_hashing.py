"""File hashes as the Stable Diffusion tools report them."""

from __future__ import annotations

import hashlib
import json
import string
import threading
from collections.abc import Iterable
from pathlib import Path

from automerge.errors import CheckpointError
from automerge.files import CACHE_DIR_VARIABLE as CACHE_DIR_VARIABLE
from automerge.files import cache_dir, write_text_atomic

CHUNK_BYTES = 1 << 20  # 1 MiB
_SHORT_HASH_DIGITS = 10
_cache_lock = threading.Lock()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of the file's bytes, read in 1 MiB chunks."""
    path = Path(path)
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    try:
        with path.open("rb", buffering=0) as f:
            while n := f.readinto(buffer):
                digest.update(view[:n])
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise CheckpointError(f"cannot hash {path}: {exc.strerror}") from None
    return digest.hexdigest()


def a1111_short_hash(sha256_hex: str) -> str:
    """A1111's "AutoV2" short model hash: the first 10 hex digits of the file's sha256."""
    if len(sha256_hex) != 64 or any(c not in string.hexdigits for c in sha256_hex):
        raise ValueError(f"expected a 64-digit hex sha256, got {sha256_hex!r}")
    return sha256_hex[:_SHORT_HASH_DIGITS].lower()


def a1111_legacy_hash(path: Path) -> str:
    """A1111's legacy model hash (``sd_merge_models[…].legacy_hash``, the "[1a2b3c4d]" of old UIs):
    the first 8 hex digits of the sha256 of the 64 KiB at offset 1 MiB."""
    with open(path, "rb") as file:
        file.seek(0x100000)
        return hashlib.sha256(file.read(0x10000)).hexdigest()[:8]


def hash_cache_path() -> Path:
    """``$AUTOMERGE_CACHE_DIR/sha256.json``, else ``$XDG_CACHE_HOME/automerge/…``, else ``~/.cache/automerge/…``."""
    return cache_dir() / "sha256.json"


def cached_sha256(path: str | Path) -> str:
    """``sha256_file`` through a cache keyed by absolute path, size and mtime (as A1111's cache.json
    keeps model hashes), so a multi-GB checkpoint is hashed once until it changes.

    The cache is only a shortcut: when it cannot be read or written the file is simply hashed.
    """
    path = Path(path).resolve()
    stat = path.stat()
    key, stamp = str(path), [stat.st_size, stat.st_mtime_ns]
    with _cache_lock:
        entry = _read_cache().get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and _is_sha256(entry.get("sha256")):
        return entry["sha256"]
    digest = sha256_file(path)
    with _cache_lock:
        cache = _read_cache()
        cache[key] = {"stamp": stamp, "sha256": digest}
        _write_cache(cache)
    return digest


def warm_hash_cache(paths: Iterable[Path]) -> threading.Thread:
    """Hash ``paths`` into the cache in a background daemon thread (e.g. while a study runs)."""

    def work() -> None:
        for path in paths:
            try:
                cached_sha256(path)
            except (OSError, CheckpointError):
                pass  # the export hashes it again and reports the error then

    thread = threading.Thread(target=work, name="automerge-hash-cache", daemon=True)
    thread.start()
    return thread


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in string.hexdigits for c in value)


def _read_cache() -> dict:
    try:
        data = json.loads(hash_cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(cache: dict) -> None:
    """Atomically, so a reader never sees half a cache; failures leave it as it was."""
    target = hash_cache_path()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(target, json.dumps(cache))
    except OSError:
        return
