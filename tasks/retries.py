"""When a failed task is worth another try: each task names the errors a retry cannot fix."""

from __future__ import annotations

from typing import Optional


def raised(state) -> Optional[BaseException]:
    """The exception a task run's final state carries, or None when it did not fail."""
    try:
        state.result()
    except Exception as error:
        return error
    return None
