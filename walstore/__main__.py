"""``python -m walstore``: the same command line as ``walstore``."""

from walstore.cli import main

main()
