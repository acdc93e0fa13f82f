"""`python3 -m vmagent ...` runs the agent (see vmagent.cli)."""

from vmagent.cli import main

main()
