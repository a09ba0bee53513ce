"""``python -m combinability`` runs the command line."""

from combinability.cli import main

raise SystemExit(main())
