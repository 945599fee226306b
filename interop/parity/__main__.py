"""``python -m interop.parity``: see :mod:`interop.parity.cli`."""

from interop.parity.cli import main

raise SystemExit(main())
