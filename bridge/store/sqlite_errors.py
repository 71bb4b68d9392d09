"""SQLite's errors turned into the store's own (bridge/errors.py), at the store's edge."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from bridge.errors import Conflict, StorageFailed

P = ParamSpec("P")
R = TypeVar("R")


def translated(method: Callable[P, R]) -> Callable[P, R]:
    """Run a store method with SQLite's errors turned into Conflict or StorageFailed."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except (sqlite3.ProgrammingError, sqlite3.InterfaceError):
            raise  # a bug (a closed handle, a bad statement), not the database's answer
        except sqlite3.IntegrityError as exc:
            raise Conflict(one_line(exc)) from None
        except sqlite3.Error as exc:
            raise StorageFailed(one_line(exc)) from None

    return wrapper


def one_line(exc: BaseException) -> str:
    """No paths or SQL: what an operator needs to recognise the fault."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
