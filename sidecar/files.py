"""The files a config names: can the node's user use them, and are the secret ones private?

`check-config` reports every referenced file that is missing or that the user the node
runs as cannot read (or, for a command, execute), so a node does not find out at start,
or worse, at its first failover. Secret files (the cluster key, the API token) that every
user on the machine can read, or that others can rewrite, are warned about at start and by
`check-config`, as ssh does for private keys. It is a warning, not a refusal: container
secret mounts are often 0444 inside a filesystem no other user shares, and refusing would
break those set-ups without making them safer.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from sidecar.config import Config
from sidecar.hooks import HOOK_KEYS


@dataclass(frozen=True)
class FileUse:
    """One file a config refers to: the key that names it, and how the node uses it."""

    key: str
    path: str
    use: Literal["read", "execute"]
    secret: bool = False


@dataclass(frozen=True)
class FileWarning:
    key: str
    message: str


def referenced_files(config: Config) -> list[FileUse]:
    """Every file the node will open or run, with the config key that names it."""
    uses = [FileUse("--config", config.source, "read")]
    if config.cluster_key_file is not None:
        uses.append(FileUse("cluster_key_file", str(config.cluster_key_file), "read", True))
    do = config.digitalocean
    if do.token_file is not None:
        uses.append(FileUse("digitalocean.token_file", do.token_file, "read", True))
    if do.ca_file is not None:
        uses.append(FileUse("digitalocean.ca_file", do.ca_file, "read"))
    commands = {
        "health.command": config.health.command,
        **{f"hooks.{key}": getattr(config.hooks, key) for key in HOOK_KEYS},
    }
    for key, argv in commands.items():
        if argv:
            uses.append(FileUse(key, argv[0], "execute"))
    return uses


def access_problems(uses: list[FileUse], user: str | None = None) -> list[str]:
    """One line per file that `user` (default: this process's user) cannot use, naming the key.

    Checking as another user needs root: the check switches the effective user and groups
    for its duration, so the kernel itself answers (ACLs and all), then switches back.
    """
    with _acting_as(user):
        return [problem for use in uses if (problem := _problem(use)) is not None]


def _problem(use: FileUse) -> str | None:
    path = use.path
    if use.use == "execute" and "/" not in path:
        found = shutil.which(path)
        if found is None:
            return f"{use.key}: program {path!r} is not found in PATH"
        path = found
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return f"{use.key}: {path} does not exist"
    except PermissionError:
        return f"{use.key}: {path}: a directory on its path is not searchable by {_who()}"
    except OSError as exc:
        return f"{use.key}: {path}: {exc.strerror}"
    if stat.S_ISDIR(info.st_mode):
        return f"{use.key}: {path} is a directory, not a file"
    mode, verb = (os.R_OK, "readable") if use.use == "read" else (os.X_OK, "executable")
    if not os.access(path, mode, effective_ids=True):
        return f"{use.key}: {path} is not {verb} by {_who()}"
    return None


def _who() -> str:
    uid = os.geteuid()
    try:
        return f"user {pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f"uid {uid}"


@contextlib.contextmanager
def _acting_as(user: str | None) -> Iterator[None]:
    if user is None:
        yield
        return
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise ValueError(f"--user: no such user {user!r}") from None
    if entry.pw_uid == os.geteuid():
        yield
        return
    if os.geteuid() != 0:
        raise ValueError("--user: checking as another user needs root")
    groups = os.getgroups()
    os.setgroups(os.getgrouplist(entry.pw_name, entry.pw_gid))
    os.setegid(entry.pw_gid)
    os.seteuid(entry.pw_uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(groups)


def permission_warnings(config: Config) -> list[FileWarning]:
    """Secret files other users can read, or others can rewrite (one warning each)."""
    warnings = []
    for use in referenced_files(config):
        if not use.secret:
            continue
        try:
            mode = stat.S_IMODE(os.stat(use.path).st_mode)
        except OSError:
            continue  # a missing file is reported elsewhere, as an error
        if mode & 0o004:
            problem = "can be read by every user on this machine"
        elif mode & 0o022:
            problem = "can be rewritten by other users"
        else:
            continue
        warnings.append(
            FileWarning(
                use.key,
                f"{use.key}: {use.path} {problem} (mode {mode:04o}); "
                f"chmod 600 it (or 640 to share it with one group)",
            )
        )
    return warnings
