"""Search a live process's memory for byte strings (``/proc/PID/maps`` + ``/proc/PID/mem``).

Used to show where secrets live: every readable mapping of the process is read (as root, or as
its owner with ptrace allowed) and searched. Regions that cannot be read (``[vvar]``, guard
pages, mappings that went away meanwhile) are skipped.
"""

from __future__ import annotations

import base64
from pathlib import Path

#: Read at most this much of one mapping at a time; needles are shorter than the overlap.
CHUNK = 16 << 20
OVERLAP = 256


def forms(secret: bytes) -> set[bytes]:
    """The encodings a secret would most likely be found in, if it leaked."""
    return {
        secret,
        secret.hex().encode(),
        secret.hex().upper().encode(),
        base64.b64encode(secret),
        base64.urlsafe_b64encode(secret),
    }


def readable_regions(pid: int) -> list[tuple[int, int]]:
    regions = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        span, perms = fields[0], fields[1]
        name = fields[5] if len(fields) > 5 else ""
        if not perms.startswith("r") or name in ("[vvar]", "[vsyscall]"):
            continue
        start, end = (int(x, 16) for x in span.split("-"))
        regions.append((start, end))
    return regions


def found_in_memory(pid: int, needles: set[bytes]) -> set[bytes]:
    """The needles present anywhere in ``pid``'s readable memory."""
    found: set[bytes] = set()
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for start, end in readable_regions(pid):
            offset = start
            tail = b""
            while offset < end:
                size = min(CHUNK, end - offset)
                try:
                    mem.seek(offset)
                    data = mem.read(size)
                except (OSError, ValueError, OverflowError):
                    break
                window = tail + data
                found |= {n for n in needles - found if n in window}
                tail = data[-OVERLAP:]
                offset += size
    return found
