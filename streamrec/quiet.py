"""Quiet start-up. TensorFlow's C++ libraries log a few lines to stderr as they load, before any
of its settings can stop them (`TF_CPP_MIN_LOG_LEVEL` does not reach them): load it once with
stderr pointed away, unless the user asked for `--verbose`."""

from __future__ import annotations

import contextlib
import os
import sys

from schemas.settings import get_settings


@contextlib.contextmanager
def _stderr_to_devnull():
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def load_tensorflow() -> None:
    """Import TensorFlow now, silently when the log level is above info."""
    if "tensorflow" in sys.modules:
        return
    if get_settings().log_level in ("debug", "info"):
        import tensorflow  # noqa: F401

        return
    with _stderr_to_devnull():
        import tensorflow  # noqa: F401
