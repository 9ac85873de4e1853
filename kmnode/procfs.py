"""Reading /proc, once: a process's stat fields (state, parent, start time) for the supervisor,
the chaos faults, the KM enclave's child handling and the benchmarks."""

from __future__ import annotations

from pathlib import Path


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (index 0 is field 3, the state;
    1 the parent pid; 19 the start time), or None if the process is gone. The name may hold
    spaces and parentheses, so the fields start after its last ')'."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()
