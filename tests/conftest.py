"""Test-wide guards: no network (any non-loopback connection fails), hub libraries offline."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_LOOPBACK = ("127.", "::1", "localhost")


class NetworkBlockedError(RuntimeError):
    pass


def _is_loopback(address: object) -> bool:
    if isinstance(address, tuple) and address:
        return str(address[0]).startswith(_LOOPBACK)
    return isinstance(address, (str, bytes))  # AF_UNIX paths


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sha256 cache goes to a per-session folder, never to the user's ~/.cache."""
    monkeypatch.setenv("AUTOMERGE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "automerge-cache"))


@pytest.fixture(autouse=True)
def _block_network(monkeypatch: pytest.MonkeyPatch) -> None:
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def connect(self: socket.socket, address: object) -> None:
        if not _is_loopback(address):
            raise NetworkBlockedError(f"tests may not open network connections (to {address!r})")
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: object) -> int:
        if not _is_loopback(address):
            raise NetworkBlockedError(f"tests may not open network connections (to {address!r})")
        return real_connect_ex(self, address)

    def getaddrinfo(host: object, *args: object, **kwargs: object) -> object:
        if not str(host).startswith(_LOOPBACK):
            raise NetworkBlockedError(f"tests may not use the network (resolving {host!r})")
        return real_getaddrinfo(host, *args, **kwargs)

    real_getaddrinfo = socket.getaddrinfo
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def _tiny_family(folder: Path, family: str, fine_tunes: str) -> dict[str, Path]:
    """Base ``c`` and seeded fine-tunes of it (fp16, like real checkpoints), written once per session."""
    from automerge.tiny import write_tiny

    base = write_tiny(family, folder / "base.safetensors", seed=0)
    models = {"c": base}
    for seed, name in enumerate(fine_tunes, start=1):
        models[name] = write_tiny(family, folder / f"{name}.safetensors", seed=seed, like=base, delta=0.2)
    return models


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny SD1 models: base c, fine-tunes a, b and d of it."""
    return _tiny_family(tmp_path_factory.mktemp("tiny-sd1"), "sd1", "abd")


@pytest.fixture(scope="session")
def tiny_sdxl_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny SDXL models: base c, fine-tunes a and b of it."""
    return _tiny_family(tmp_path_factory.mktemp("tiny-sdxl"), "sdxl", "ab")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread_per_worker() -> None:
    """The suite runs in 2 xdist workers on 2 cores: one torch thread each avoids oversubscription
    (OpenMP threads spinning against each other made renders tens of times slower)."""
    import torch

    torch.set_num_threads(1)
