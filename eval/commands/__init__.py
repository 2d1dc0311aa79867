"""The evaluation subcommands of the ``accel`` CLI: ``generate``, ``eval`` and ``demo`` (see :mod:`accel.cli`)."""
