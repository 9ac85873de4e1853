"""`python -m kmnode.cli`: how `kmctl up` starts node processes, installed or not."""

from kmnode.cli import main

main()
