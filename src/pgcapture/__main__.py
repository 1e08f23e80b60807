"""``python -m pgcapture``: the same as the ``pgcapture`` command."""

from pgcapture.cli.main import main

main()
