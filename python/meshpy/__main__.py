"""`python -m meshpy` is the `meshpy` command."""

from meshpy.cli import main

raise SystemExit(main())
