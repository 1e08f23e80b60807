"""Who holds a lease, and whether that holder is provably gone.

A lease's value (JSON) names its holder for people (``host``, ``pid``, ``since``, a random
``id``) and, for other processes on the same machine, the process instance: ``boot`` (the
kernel's boot id, ``/proc/sys/kernel/random/boot_id``), ``pidns`` (the inode of its PID
namespace, ``/proc/self/ns/pid``) and ``start`` (its start time in clock ticks after boot, field
22 of ``/proc/PID/stat``, proc(5)).

A process of the same boot and PID namespace sees the holder's pid, so it can prove the holder
dead: no process has that pid (``kill(pid, 0)`` says so even where ``/proc`` hides other users'
processes, ``hidepid``), or its ``/proc`` entry shows a zombie or a process started at another
time (the pid was reused). Such a lease is taken over at once instead of waiting for its TTL, so a
restart right after ``kill -9`` needs no operator and no flag (issue 14). Nothing else proves
anything: another machine or container, another boot, a value written by an older version, or
no ``/proc`` at all (another OS), or a pid in use whose entry cannot be read, means waiting until
the lease is released or expires. The rule
errs one way only: a live holder is never taken for dead, because a live PID namespace keeps its
inode, and a live process keeps its pid and start time.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

_PROC: Final = Path("/proc")


@dataclass(frozen=True, slots=True)
class Instance:
    """One process instance: where it runs (boot, PID namespace) and which process it is."""

    boot: str
    pidns: int
    pid: int
    start: int


def process_state(pid: int, proc: Path = _PROC) -> tuple[str, int] | None:
    """(state letter, start time in ticks) of process ``pid``, or None when there is none."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the
    # last ")"; the state is field 3 and the start time field 22 (proc(5)).
    fields = stat.rpartition(")")[2].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def lookup_process(pid: int) -> tuple[str, int | None] | None:
    """None when no process has ``pid``; else its state and start time, the start None when its
    ``/proc`` entry cannot be read (another user's process under ``hidepid``)."""
    try:
        os.kill(pid, 0)  # signal 0: only whether the pid exists
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # it exists, and belongs to another user
    return process_state(pid) or ("?", None)


def current_instance(proc: Path = _PROC) -> Instance | None:
    """This process as an ``Instance``, or None when ``proc`` cannot describe it (no procfs,
    or a procfs mounted from another PID namespace, where pids are not ours)."""
    try:
        boot = (proc / "sys/kernel/random/boot_id").read_text().strip()
        pidns = os.stat(proc / "self/ns/pid").st_ino
        if int(os.readlink(proc / "self")) != os.getpid():
            return None
    except (OSError, ValueError):
        return None
    state = process_state(os.getpid(), proc)
    if not boot or state is None:
        return None
    return Instance(boot, pidns, os.getpid(), state[1])


@functools.cache
def _this_instance() -> Instance | None:
    return current_instance()


def new_owner_id() -> str:
    """A description of this process that is unique among all processes."""
    owner: dict[str, object] = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "id": uuid.uuid4().hex[:12],
    }
    instance = _this_instance()
    if instance is not None:
        owner.update(boot=instance.boot, pidns=instance.pidns, start=instance.start)
    return json.dumps(owner, separators=(",", ":"))


def describe_owner(value: bytes) -> str:
    try:
        owner = json.loads(value)
        return f"pid {owner['pid']} on host {owner['host']} (since {owner['since']})"
    except (ValueError, KeyError, TypeError):
        return repr(value[:200])


def holder_is_gone(
    holder: Mapping[str, Any],
    here: Instance | None,
    lookup: Callable[[int], tuple[str, int | None] | None],
) -> bool:
    """Whether the process that wrote ``holder`` has provably ended, seen from ``here``.

    ``lookup(pid)`` tells of a pid in ``here``'s PID namespace as ``lookup_process`` does."""
    if here is None:
        return False
    boot, pidns, pid, start = (holder.get(k) for k in ("boot", "pidns", "pid", "start"))
    if boot != here.boot or pidns != here.pidns:
        return False  # its processes are not ours to see
    if not isinstance(pid, int) or not isinstance(start, int) or pid <= 0:
        return False
    found = lookup(pid)
    if found is None:
        return True  # no such process
    state, started = found
    if started is None:
        return False  # some process has the pid, and we cannot tell which
    return started != start or state in ("Z", "X")  # pid reused, or a corpse not yet reaped


def owner_is_gone(value: bytes) -> bool:
    """``holder_is_gone`` for a lease value as stored, seen from this process."""
    try:
        holder = json.loads(value)
    except ValueError:
        return False
    if not isinstance(holder, dict):
        return False
    return holder_is_gone(holder, _this_instance(), lookup_process)
