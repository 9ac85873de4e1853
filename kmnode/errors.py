"""The error every layer may raise for a user to read: one line and an exit code.

Library code (the API client, the supervisor, the chaos tools) raises :class:`KmsimError`;
``kmctl`` prints it as one line and exits with its code, so scripts can branch on it without
parsing text: 0 success, 1 the cluster or a check refused (e.g. a quote failed verification),
2 bad usage or configuration, 3 an internal or environment failure. Keeping this below the CLI
lets those layers report errors without importing the CLI.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_FAILURE = 3


class KmsimError(Exception):
    """An error reported to the user in one line, with a meaningful exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.message = message
        # Set per instance; ``object.__setattr__`` because Click types the attribute of its
        # own exception (which CliError also is) as a ClassVar.
        object.__setattr__(self, "exit_code", exit_code)

    exit_code: int
