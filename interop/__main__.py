"""``python -m interop`` is ``python -m interop.parity``."""

from interop.parity.cli import main

raise SystemExit(main())
