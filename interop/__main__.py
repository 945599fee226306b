"""``python -m interop`` is ``python -m interop.parity``."""

from interop.parity_cli import main

raise SystemExit(main())
