"""Audit lines for token operations, written through the key service's audit log.

Fail closed (as Vault does): if the line cannot be written, the operation is undone and the
command fails. Filenames are not logged unless VHSM_AUDIT_FILENAMES=1, since the audit log is
not encrypted and a name can be as sensitive as the content.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator

from vhsmfs.errors import VhsmError


class AuditError(VhsmError):
    pass


def audit_token_event(
    event: str, tok: uuid.UUID, what: str, name: str | None, *, success: bool = True
) -> None:
    details = f"token {tok} {what}"
    if name and os.environ.get("VHSM_AUDIT_FILENAMES") == "1":
        details += f" ({name})"
    # Imported here so token commands do not pay for the key service's imports up front.
    from keysvc.audit import audit_event
    from keysvc.errors import KeysvcError

    try:
        audit_event(event, "N/A", details, success)
    except KeysvcError as e:
        raise AuditError(f"audit log: {e}") from None


@contextlib.contextmanager
def audited(undo: Callable[[], object]) -> Iterator[None]:
    """Undo the operation if its audit line could not be written."""
    try:
        yield
    except AuditError:
        with contextlib.suppress(Exception):
            undo()
        raise
