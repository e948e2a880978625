"""The checks every config dataclass runs in ``__post_init__``: each failure is one
:class:`~sdharness.errors.ConfigError` line naming the field and the fix."""

from __future__ import annotations

import math
import string

from sdharness.errors import ConfigError


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def choice(field_name: str, value: str, choices: tuple[str, ...] | list[str]) -> None:
    require(value in choices, f"{field_name}={value!r} is unknown; choose one of: {', '.join(choices)}")


def positive(field_name: str, value: float, fix: str = "") -> None:
    require(0 < value < math.inf, f"{field_name} must be a finite positive number, got {value!r}" +
             (f"; {fix}" if fix else ""))


def placeholders(template: str, field_name: str = "template") -> set[str]:
    """Names of the ``{placeholders}`` in a format string; a malformed one (an unmatched brace)
    is a :class:`ConfigError` naming ``field_name``."""
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        raise ConfigError(f"{field_name}={template!r} is not a valid template ({error}); placeholders are "
                          "written {name}, a literal brace as {{ or }}") from None
