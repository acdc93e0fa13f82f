"""python -m images: the dcp-image CLI."""

from images.cli import main

main()
