"""Wrapping a kafka-python method once per process: where the client has no hook for a fault.

`headers` and `record_batches` each replace a method of the client's fetch path with a
tolerant wrapper of it. Wrapping is idempotent (the wrapper is marked), and a client without
the method is logged and left as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def wrap_once(
    owner: Any, name: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]], missing: str
) -> bool:
    """Replace `owner.name` by `wrap(owner.name)`, once; False (logging `missing`) where the
    installed client has no such method."""
    strict = getattr(owner, name, None) if owner is not None else None
    if strict is None:
        log.warning(
            "kafka-python has no %s.%s; %s", getattr(owner, "__name__", owner), name, missing
        )
        return False
    if getattr(strict, "tolerant", False):
        return True
    wrapper = wrap(strict)
    wrapper.tolerant = True  # type: ignore[attr-defined]
    setattr(owner, name, wrapper)
    return True


def marker(headers: Any, key: str) -> Any:
    """The value of header `key` in a record's headers, else None."""
    for item in headers or ():
        if isinstance(item, tuple | list) and len(item) == 2 and item[0] == key:
            return item[1]
    return None
