"""One error type for everything a user can get wrong.

The CLI catches `KeelError` and prints its message as one line (no traceback), then exits 2.
Messages name the file, row and field (or the flag) so the user can fix the input directly.
"""


class KeelError(Exception):
    """A user-facing error: bad flag, bad file, bad row. Printed as one line, exit status 2."""


def where(path, row=None, field=None) -> str:
    """Format a location prefix: `data.json: row 3: field 'output'`."""
    parts = [str(path)]
    if row is not None:
        parts.append(f"row {row}")
    if field is not None:
        parts.append(f"field '{field}'")
    return ": ".join(parts)
