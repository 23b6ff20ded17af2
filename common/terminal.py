"""Untrusted text made safe to print: no Rich markup, no terminal control sequences.

Text a device, a peer or a file supplied (a quarantined record, a device id, a drop reason, an error
that quotes them) reaches an operator's terminal through Rich. Rich reads ``[...]`` as markup, and a
terminal obeys escape sequences (ESC, CSI and the other C0/C1 controls), which can rewrite what the
operator sees or the window title. :func:`shown` turns both into visible text.
"""

from __future__ import annotations

import re

from rich.markup import escape

_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 and C1 controls, DEL; tab and newline kept


def shown(text: object) -> str:
    """``text`` as Rich should print it: markup escaped, control characters as ``\\xNN``."""
    plain = str(text).encode("utf-8", "backslashreplace").decode()
    return escape(_CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", plain))
