"""One line for a pydantic validation error, in the style of every haina config: ``section.field: message``.

Used by each typed config (the training config, the data job's config) so that a bad value reads the same
everywhere: the dotted place of the first error, then what is wrong with the value it got; an unknown key
lists the keys allowed where it stands.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ValidationError

__all__ = ["SectionError", "allowed_keys_of", "first_error", "one_line_validation_error"]


class SectionError(ValueError):
    """Raised inside a validator for a bad place below the field being validated (a nested section);
    ``path`` is that place, relative to the field, and ``message`` what is wrong there."""

    def __init__(self, path: Sequence[str | int], message: str) -> None:
        super().__init__(message)
        self.path = tuple(str(p) for p in path)
        self.message = message


def first_error(
    error: ValidationError,
    allowed_keys: Callable[[tuple[Any, ...]], list[str]] | None = None,
    unknown: str = "unknown key",
) -> tuple[tuple[str, ...], str]:
    """(dotted place, message) of the first error of ``error``. ``allowed_keys(loc)`` names the keys allowed
    beside the unknown key at ``loc`` (the key itself is ``loc[-1]``); without it, or when it returns
    nothing, an unknown key is reported without the list. ``unknown`` words that case."""
    first = error.errors()[0]
    loc = tuple(str(p) for p in first["loc"])
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, SectionError):
        return (*loc, *cause.path), cause.message
    if first["type"] == "extra_forbidden":
        allowed = allowed_keys(tuple(first["loc"])) if allowed_keys is not None else []
        return loc, f"{unknown}; allowed: {', '.join(allowed)}" if allowed else unknown
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] not in ("value_error", "assertion_error"):
        message = f"{message} (got {first.get('input')!r})"
    return loc, message


def one_line_validation_error(
    error: ValidationError, allowed_keys: Callable[[tuple[Any, ...]], list[str]] | None = None
) -> str:
    """``a.b.c: message`` for the first error of ``error`` (see :func:`first_error`)."""
    loc, message = first_error(error, allowed_keys)
    return f"{'.'.join(loc) or 'config'}: {message}"


def _model(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def allowed_keys_of(root: type[BaseModel]) -> Callable[[tuple[Any, ...]], list[str]]:
    """An ``allowed_keys`` for :func:`one_line_validation_error`: the fields of the section of ``root`` that
    holds ``loc[-1]``, found by following ``loc`` through nested models (and lists or mappings of them).
    A section with a classmethod ``allowed_keys()`` (one that accepts more than its fields) answers itself."""

    def allowed(loc: tuple[Any, ...]) -> list[str]:
        model = root
        parts = list(loc[:-1])
        while parts:
            field = model.model_fields.get(str(parts.pop(0)))
            if field is None:
                return []
            inner = _model(field.annotation)
            if inner is None and get_origin(field.annotation) in (list, tuple, dict) and parts:
                inner = _model(get_args(field.annotation)[-1])  # list[Model] / dict[str, Model]: skip the index
                parts.pop(0)
            if inner is None:
                return []
            model = inner
        own = getattr(model, "allowed_keys", None)
        return list(own()) if callable(own) else sorted(model.model_fields)

    return allowed
