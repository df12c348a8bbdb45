"""The one error type stepquant raises for bad input or a refused operation.

Its message is a single line that names the file or tensor and the problem; the CLI prints it and
exits with code 2, without a traceback.
"""

from __future__ import annotations


class StepquantError(Exception):
    """Bad input or a refused operation; `str(err)` is the one-line message for the user."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
