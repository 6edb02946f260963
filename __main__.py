"""``python -m wakepoint``: the same command as the ``wakepoint`` console script."""

from .cli import main

raise SystemExit(main())
