"""Core subcommands of the ``accel`` CLI (see :mod:`accel.cli`)."""
