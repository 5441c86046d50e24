"""``python -m cet``: the same command line as the ``cet`` console script."""

from .cli import main

raise SystemExit(main())
