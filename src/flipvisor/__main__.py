"""``python -m flipvisor``: the same as the ``flipvisor`` command."""

from flipvisor.cli import main

main()
