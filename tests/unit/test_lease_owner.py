"""The takeover rule of leases (``pgcapture.log.owner``): a holder is taken for dead only when
this process can see that it is; everything else waits for the lease to be released or expire."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pgcapture.log import owner
from pgcapture.log.owner import (
    Instance,
    current_instance,
    holder_is_gone,
    lookup_process,
    new_owner_id,
    owner_is_gone,
    process_state,
)

HERE = Instance(boot="b-1", pidns=4026531836, pid=100, start=5000)
HOLDER = {"host": "h", "pid": 42, "since": "2026-01-01T00:00:00Z", "id": "x", "boot": "b-1",
          "pidns": 4026531836, "start": 777}  # fmt: skip


@pytest.mark.parametrize(
    ("processes", "gone"),
    [
        ({}, True),  # the pid is not running
        ({42: ("S", 900)}, True),  # the pid now belongs to a process started later
        ({42: ("Z", 777)}, True),  # killed, not reaped yet: it cannot write
        ({42: ("S", 777)}, False),  # the holder itself, alive
        ({42: ("D", 777)}, False),  # alive, in uninterruptible sleep
        ({42: ("?", None)}, False),  # some process has the pid; /proc hides which (hidepid)
    ],
)
def test_a_holder_seen_from_its_own_machine(
    processes: dict[int, tuple[str, int | None]], gone: bool
) -> None:
    assert holder_is_gone(HOLDER, HERE, processes.get) is gone


@pytest.mark.parametrize(
    "change",
    [
        {"boot": "b-2"},  # another boot, or another machine
        {"pidns": 4026532000},  # another container: its pids are not ours
        {"boot": None},  # written by a version without the fields
        {"start": None},
        {"pid": "42"},
        {"pid": 0},
    ],
)
def test_a_holder_this_process_cannot_see_is_never_gone(change: dict[str, object]) -> None:
    holder = {k: v for k, v in {**HOLDER, **change}.items() if v is not None}
    assert holder_is_gone(holder, HERE, {}.get) is False


def test_without_a_description_of_this_process_nothing_is_gone() -> None:
    assert holder_is_gone(HOLDER, None, {}.get) is False


def test_process_state_reads_a_command_name_with_spaces_and_parentheses(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    fields = " ".join(str(n) for n in range(4, 60))
    (tmp_path / "42" / "stat").write_text(f"42 (a) b (c)) R {fields}\n")
    assert process_state(42, tmp_path) == ("R", 22)
    assert process_state(43, tmp_path) is None


def test_no_procfs_describes_no_process(tmp_path: Path) -> None:
    assert current_instance(tmp_path) is None


def test_this_process_is_alive() -> None:
    here = current_instance()
    assert here is not None
    assert here.pid == os.getpid()
    assert process_state(os.getpid()) == ("R", here.start)
    assert lookup_process(os.getpid()) == ("R", here.start)
    assert not owner_is_gone(new_owner_id().encode())
    assert not owner_is_gone(b"not json")
    assert not owner_is_gone(b"[1, 2]")


def test_a_live_process_whose_proc_entry_is_hidden_is_not_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert owner.current_instance() is not None
    held = new_owner_id().encode()  # this process, described before /proc hides it
    monkeypatch.setattr(owner, "process_state", lambda pid, proc=None: None)  # hidepid=2
    assert lookup_process(os.getpid()) == ("?", None)
    assert not owner_is_gone(held)


def test_a_killed_process_is_gone_before_and_after_it_is_reaped() -> None:
    with subprocess.Popen(
        [sys.executable, "-c",
         "import time; from pgcapture.log.owner import new_owner_id; "
         "print(new_owner_id(), flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
    ) as child:  # fmt: skip
        try:
            assert child.stdout is not None
            owner = child.stdout.readline()
            assert json.loads(owner)["pid"] == child.pid
            assert not owner_is_gone(owner)
            child.send_signal(signal.SIGKILL)
            deadline = time.monotonic() + 10
            while process_state(child.pid) not in (None, ("Z", json.loads(owner)["start"])):
                assert time.monotonic() < deadline, process_state(child.pid)
                time.sleep(0.01)
            assert owner_is_gone(owner)  # killed, not reaped yet
            child.wait(10)
            assert owner_is_gone(owner)
        finally:
            child.kill()
