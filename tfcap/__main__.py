"""`python -m tfcap` is the same as the `tfcap` command."""

from tfcap.cli import main

main()
