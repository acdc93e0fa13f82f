"""python -m oss: the dcp-oss command."""

from oss.cli import main

main()
