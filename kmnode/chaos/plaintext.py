"""The host never holds plaintext keys: search host-side bytes (files, logs, captured MQTT
payloads) for secrets in every encoding the host could plausibly hold them in."""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kmnode.chaos.outcome import CheckOutcome, Violation

#: Shorter needles would match by chance in megabytes of logs.
MIN_NEEDLE = 8


@dataclass(frozen=True, slots=True)
class PlaintextHit:
    source: str
    offset: int
    encoding: str
    needle: int  #: index into the needles


def _encodings(needle: bytes) -> list[tuple[str, bytes]]:
    """Every way the host could plausibly hold ``needle``: raw, hex in either case, and base64
    (standard and URL-safe) at each of the three alignments a needle can have inside a longer
    base64 text — only the characters determined by the needle's own bits are searched.
    Line-wrapped base64 (MIME, PEM) is not unwrapped: the runner feeds such sources unwrapped."""
    forms = [
        ("raw", needle),
        ("hex", needle.hex().encode()),
        ("HEX", needle.hex().upper().encode()),
    ]
    for shift in range(3):
        total = shift + len(needle)
        encoded = base64.b64encode(bytes(shift) + needle)
        core = encoded[(0, 2, 3)[shift] : 4 * (total // 3)]
        forms.append((f"base64@{shift}", core))
        forms.append((f"base64url@{shift}", core.translate(bytes.maketrans(b"+/", b"-_"))))
    return forms


def scan_plaintext(
    haystacks: Iterable[tuple[str, bytes]], needles: Sequence[bytes]
) -> list[PlaintextHit]:
    """Where any secret needle appears in any haystack (file, log, captured MQTT payload)."""
    for needle in needles:
        if len(needle) < MIN_NEEDLE:
            raise ValueError(f"needle of {len(needle)} bytes is too short to scan for")
    forms = [(i, name, form) for i, n in enumerate(needles) for name, form in _encodings(n)]
    hits = []
    for source, data in haystacks:
        for index, name, form in forms:
            offset = data.find(form)
            if offset >= 0:
                hits.append(PlaintextHit(source, offset, name, index))
    return hits


def check_plaintext(
    haystacks: Iterable[tuple[str, bytes]], needles: Sequence[bytes]
) -> CheckOutcome:
    stacks = list(haystacks)
    hits = scan_plaintext(stacks, needles)
    violations = [
        Violation(f"secret #{h.needle} found {h.encoding} in {h.source} at offset {h.offset}")
        for h in hits
    ]
    if violations:  # the first in haystack order, as the runner listed them
        first = violations[0]
        return CheckOutcome(False, f"{first.message} [{len(hits)} hits]", first, len(hits))
    size = sum(len(d) for _, d in stacks)
    return CheckOutcome(
        True, f"{len(needles)} secrets absent from {len(stacks)} sources ({size} B)"
    )
