"""Server checks name the problem and the fix."""

from __future__ import annotations

from pgcapture.capture.setup import server_problem


def test_old_server_names_the_minimum_version() -> None:
    problem = server_problem(130016, "13.16", "logical")
    assert problem is not None
    assert "13.16 is not supported" in problem
    assert "14 or newer" in problem


def test_wal_level_problem_names_the_fix() -> None:
    problem = server_problem(150018, "15.18", "replica")
    assert problem == (
        'wal_level is "replica"; logical replication needs wal_level=logical '
        "(ALTER SYSTEM SET wal_level = logical; then restart the server)"
    )


def test_supported_server_has_no_problem() -> None:
    assert server_problem(140000, "14.0", "logical") is None
