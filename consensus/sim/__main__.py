"""Entry point of ``python -m consensus.sim``."""

from consensus.sim.cli import main

raise SystemExit(main())
