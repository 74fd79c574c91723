"""``python -m pipeline``: the ``pipe`` command (what ``torchrun -m pipeline`` runs on each rank)."""

from .cli import main

main()
