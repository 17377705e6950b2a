"""Errors a user sees. Every one names the file and the problem."""

from __future__ import annotations

from pathlib import Path


class DiffmemError(Exception):
    """A problem with a user's input or request, reported without a traceback by the CLI."""

    def __init__(self, problem: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)


def one_line(text: str) -> str:
    """``text`` with its line breaks folded, so an error is always exactly one line (of stderr, of a summary row)."""
    return " ".join(text.split()) or "(no message)"


class FileFormatError(DiffmemError):
    """A file is not what it claims to be: truncated, corrupt, a pickle, an unknown layout."""


class BadWeightsError(DiffmemError):
    """A tensor holds NaN or Inf, or has a shape that cannot be right."""


class BaseMismatchError(DiffmemError):
    """A LoRA does not belong to the base checkpoint it was given."""
