"""Keep third-party chatter off stderr under `--quiet` / `--json`.

The noise comes from several layers: Python logging (torchao's "Failed to load ..." lines, the
torch pytree deprecation warning), Python warnings, and C++ code that writes straight to file
descriptor 2 (absl's "All log messages before absl::InitializeLog()", the TFLite converter's
flatbuffer_export lines, the interpreter's "Created TensorFlow Lite XNNPACK delegate"). Logging
and warning filters cannot reach the C++ writers, so `silenced` points descriptor 2 itself at a
temporary file for the length of a command (child processes inherit it too) and also lowers the
TensorFlow/glog log levels before those libraries are first imported. What was captured is
dropped when the command ends normally or with a fair-edge error, and written back to stderr
when it ends with an unexpected exception, so a crash still shows its context.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import TextIO

QUIET_ENV: dict[str, str] = {
    "TF_CPP_MIN_LOG_LEVEL": "3",  # TensorFlow / TFLite C++ logging: fatal only
    "GLOG_minloglevel": "3",  # glog/absl-style C++ logging: fatal only
}
"""Log levels set (unless the user set them) before the converter and interpreter load."""

STDERR_FD = 2


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    """Set `values` where the environment does not have them; put the environment back after."""
    added = [k for k in values if k not in os.environ]
    for k in added:
        os.environ[k] = values[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


@contextlib.contextmanager
def silenced(
    enabled: bool = True, expected: tuple[type[BaseException], ...] = ()
) -> Iterator[None]:
    """Send everything written to stderr (descriptor 2 and `sys.stderr`) to a temporary file.

    On an exception that is not one of `expected`, the captured text is written to the real
    stderr before the exception goes on, so an unexpected failure is not hidden.
    """
    if not enabled:
        yield
        return
    outer = sys.stderr
    with tempfile.TemporaryFile(prefix="fair-edge-stderr-") as sink, _env(QUIET_ENV):
        _flush(outer)
        saved = os.dup(STDERR_FD)
        try:
            os.dup2(sink.fileno(), STDERR_FD)
            with (
                open(sink.fileno(), "w", encoding="utf-8", errors="replace", closefd=False) as text,
                contextlib.redirect_stderr(text),
            ):
                yield
        except BaseException as exc:
            _flush(outer)
            os.dup2(saved, STDERR_FD)
            if not isinstance(exc, expected):
                _replay(sink.fileno())
            raise
        finally:
            _flush(outer)
            os.dup2(saved, STDERR_FD)
            os.close(saved)


def _flush(stream: TextIO | None) -> None:
    """Flush a stream that may be missing or closed (best effort: it only moves chatter)."""
    if stream is not None:
        with contextlib.suppress(ValueError, OSError):
            stream.flush()


def _replay(fd: int) -> None:
    """Copy what was captured in `fd` to the (restored) real stderr."""
    with contextlib.suppress(OSError):
        os.lseek(fd, 0, os.SEEK_SET)
        while chunk := os.read(fd, 1 << 16):
            os.write(STDERR_FD, chunk)
