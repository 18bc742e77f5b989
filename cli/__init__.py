"""The ``fedsilo`` command line (``cli.main:main``)."""
