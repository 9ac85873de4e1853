"""How deep a JSON text nests, bounded before anything parses it.

A parser recurses (or keeps a stack) per level, so the depth of what a host, a client or a
peer sends must be judged first, from the text. Counting brackets is a cheap upper bound:
brackets inside strings count too, so a text can only be judged deeper than it is, never
shallower. One function serves the operator API (``kmnode.api_routes``) and the KM state
machine's commands (``kmnode.km.commands``).
"""

from __future__ import annotations


def deeper_than(text: str | bytes, limit: int) -> bool:
    """Whether ``text`` may nest arrays and objects more than ``limit`` levels deep."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")  # one character a byte; the brackets are ASCII
    if text.count("[") + text.count("{") <= limit:
        return False  # the common case, at C speed: too few brackets to be that deep
    depth = 0
    for char in text:
        if char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False
