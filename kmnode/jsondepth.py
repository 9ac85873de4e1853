"""How deep a JSON text nests, bounded before anything parses it.

A parser recurses (or keeps a stack) per level, so the depth of what a host, a client or a
peer sends must be judged first, from the text. The scan follows JSON's strings (a bracket in
a string nests nothing, a ``\"`` does not end one) the way a parser's lexer does, so it never
judges a text shallower than a parser would build it; a text with fewer brackets than the
limit is let through without a scan. One function serves the operator API
(``kmnode.api_routes``) and the KM state machine's commands (``kmnode.km.commands``).
"""

from __future__ import annotations


def deeper_than(text: str | bytes, limit: int) -> bool:
    """Whether ``text`` may nest arrays and objects more than ``limit`` levels deep."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")  # one character a byte; the brackets are ASCII
    if text.count("[") + text.count("{") <= limit:
        return False  # the common case, at C speed: too few brackets to be that deep
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False
