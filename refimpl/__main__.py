"""``python -m refimpl``: the same as the ``refimpl`` command (refimpl.cli)."""

from .cli import main

raise SystemExit(main())
