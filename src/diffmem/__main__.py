"""``python -m diffmem`` runs the command-line interface."""

from diffmem.cli import main

raise SystemExit(main())
