"""The project's one error type for problems the user can fix.

It lives alone, below everything else, so that every layer (the Ludwig patches, prep, eval, the commands) can raise
it without importing anything that imports it back.
"""

from __future__ import annotations


class WorkflowError(RuntimeError):
    """An error the user can fix; the CLI wrappers print it as one line (naming the input and the fix) instead of a
    traceback."""
