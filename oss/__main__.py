"""python -m oss: the dcp-oss command (named so: its usage lines and completion)."""

from oss.cli import main

main(prog_name="dcp-oss")
