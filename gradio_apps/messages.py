"""How the apps refuse a request: a message on the page (and to API clients) that names the setting, and no
server-side traceback, since the app did nothing wrong."""

import math
from typing import Any

import gradio as gr

INVALID = "Invalid setting"


def user_error(message: str, title: str, duration: float | None = 10) -> gr.Error:
    """A message for the page, without a server-side traceback."""
    return gr.Error(message, duration=duration, title=title, print_exception=False)


def check_number(name: str, value: Any, low: float, high: float) -> float:
    """`value` as a float within [low, high]; NaN, infinities and numbers out of range are refused by name
    (Gradio's own bounds checks let NaN through and do not say which setting they refuse)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise user_error(f"{name} must be a finite number, got {value!r}.", INVALID)
    if not low <= number <= high:
        raise user_error(f"{name} must be between {low:g} and {high:g}, got {number:g}.", INVALID)
    return number
