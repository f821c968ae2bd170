"""Running the command line in-process, for the tests that check its output and error lines."""

from __future__ import annotations

import contextlib
import io

from fair_edge.cli import main


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `fair-edge <argv>`."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def cli_error(argv: list[str]) -> str:
    """Run a command that must fail as bad input; return its one error line."""
    code, out, err = run_cli(argv)
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fair-edge: error: ")
    return lines[0]
