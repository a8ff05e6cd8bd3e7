"""``python -m ptqkit``: the command line (``ptqkit/cli.py``)."""
from .cli import entry

entry()
