"""Name -> object tables filled by decorators, so adding a search is a new function, never a new branch."""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

__all__ = ["registrar"]

T = TypeVar("T")


def registrar(table: dict[str, T]) -> Callable[[str], Callable[[T], T]]:
    """A decorator factory: `@register("name")` files the decorated object in `table` under "name"."""
    def register(name: str) -> Callable[[T], T]:
        def wrap(obj: T) -> T:
            table[name] = obj
            return obj
        return wrap
    return register
