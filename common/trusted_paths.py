"""Files a trust decision rests on must not be changeable by another local user.

A device trusts what its state folder holds (the coordinator's package-signing key, its privacy
account, the active adapter slot) and a coordinator trusts the keys it reads. If another local user
can write such a file, or the folder it sits in (and so replace the file), they can swap in their own
key and have a forged package applied, or reset a privacy account. So a path is refused when it is
owned by anyone but this user or root, or is writable by its group or by others. What fleetlora
writes itself is created owner-only (folders 0700, private files 0600, public keys 0644), whatever
the umask.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fleetlora.common.errors import ConfigError

OWNER_ONLY_FOLDER = 0o700


def check_trusted(path: Path) -> None:
    """Refuse ``path`` (an existing file or folder) if another local user could change it."""
    if os.name != "posix":
        return  # Windows ACLs are not modes; the folder's ACL is the operator's to set
    info = path.stat()
    user = os.getuid()
    if info.st_uid not in (user, 0):
        raise ConfigError(
            f"{path} belongs to user id {info.st_uid}, not to this user ({user}) or root: another user "
            f"could replace what fleetlora trusts there. Run `chown {user} {path}` or use a folder of yours."
        )
    # A sticky folder (/tmp) lets others add files but not replace or remove this user's.
    sticky_folder = stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky_folder:
        raise ConfigError(
            f"{path} can be written by its group or by others (mode {stat.S_IMODE(info.st_mode):o}): another "
            f"user could replace what fleetlora trusts there. Run `chmod go-w {path}`."
        )


def make_trusted_folder(path: Path) -> None:
    """Create ``path`` (and missing parents) owner-only; an existing folder is checked instead."""
    if not path.exists():
        path.mkdir(parents=True, mode=OWNER_ONLY_FOLDER)
        path.chmod(OWNER_ONLY_FOLDER)  # mkdir's mode is cut by the umask; this is not
    check_trusted(path)
