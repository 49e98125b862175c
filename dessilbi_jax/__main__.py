"""``python -m dessilbi_jax``: the ``dessilbi`` command."""

from dessilbi_jax.cli import main

raise SystemExit(main())
