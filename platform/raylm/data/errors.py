"""The data layer's user-facing error, and recovering it from a failed Ray Data run."""

from __future__ import annotations


class DataError(ValueError):
    """A user-caused data problem (missing path, empty corpus, bad rows under strict mode)."""


def find_data_error(error: BaseException) -> DataError | None:
    """The :class:`DataError` a Ray Data task raised, dug out of Ray's wrappers; None if there is none.

    Ray re-raises a task's exception as ``RayTaskError(UserCodeException)``
    whose text is the remote traceback; depending on the path the original
    error object is further down the cause chain or only in that text. The
    user should see its one-line message, not the traceback.
    """
    marker = f"{__name__}.DataError: "
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, DataError) and type(current).__module__ == __name__:
            return current
        for line in str(current).splitlines():
            if line.strip().startswith(marker):
                return DataError(line.strip()[len(marker):])
        pending.extend([getattr(current, "cause", None), current.__cause__, current.__context__])
    return None
