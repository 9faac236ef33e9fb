"""``python -m crossent``: the ``crossent`` command (see :mod:`crossent.cli`)."""

from crossent.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
