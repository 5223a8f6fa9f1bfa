import socket

import pytest


def test_outside_connections_are_refused_in_tests() -> None:
    with pytest.raises(RuntimeError, match="network"):
        socket.create_connection(("huggingface.co", 443), timeout=1)
