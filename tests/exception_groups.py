"""What a trio nursery raised, seen through its exception groups."""

from __future__ import annotations


def leaves(exc: BaseException) -> list[BaseException]:
    """Every exception inside ``exc`` that is not itself a group, depth first (``exc`` itself
    when it is none): what each task of the nurseries raised."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]
