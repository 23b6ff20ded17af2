"""Canonical JSON: the one byte form of a document that is signed, hashed or bound into a ciphertext.

Sorted keys and no spaces, so equal documents give equal bytes whoever writes them: a package
manifest (signed by the coordinator), an upload's HPKE ``info`` (rebuilt by the coordinator and
compared byte for byte), a device's adapter pointer (checksummed). ASCII output, so the bytes do not
depend on how a platform encodes text.
"""

from __future__ import annotations

import json
from typing import Any


def canonical_json(document: Any) -> bytes:
    """``document`` as canonical JSON bytes: sorted keys, ``,`` and ``:`` separators, ASCII."""
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
