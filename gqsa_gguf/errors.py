"""The one base of every error gqsa-gguf reports as a clear message.

Every module's own error class (ModelError, GGUFError, ExportError, ...) derives from `GQSAError`
and from the builtin it always was (ValueError for bad input, RuntimeError for a step that could
not proceed), so existing `except ValueError` callers keep working. The CLI prints a GQSAError's
message without a traceback and exits 1 (2 for a ConfigError: a wrong command line); anything else
is a bug and keeps its traceback. A message says what, where, the offending value and how to fix it.
"""

__all__ = ["GQSAError"]


class GQSAError(Exception):
    """Base of the errors the CLI reports by their message alone."""
