"""``python -m automerge``: the same as the ``automerge`` command."""

from automerge.cli import main

main()
