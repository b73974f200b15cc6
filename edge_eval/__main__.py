"""``python -m edge_eval``: the same as the ``edge-eval`` command."""
from edge_eval.cli import main

raise SystemExit(main())
