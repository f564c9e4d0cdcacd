"""Warnings attributed to the user's code, not to jaxlrp's."""

from __future__ import annotations

import sys
import warnings


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """`warnings.warn` at the first caller outside jaxlrp."""
    frame, level = sys._getframe(1), 2  # level 1 is this function
    while frame is not None and frame.f_globals.get("__name__", "").startswith("jaxlrp."):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
