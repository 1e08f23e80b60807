"""Server checks name the problem and the fix."""

from __future__ import annotations

from pgcapture.capture.setup import server_problem


def test_old_server_names_the_minimum_version() -> None:
    problem = server_problem(110022, "11.22", "logical")
    assert problem is not None
    assert "11.22 is not supported" in problem
    assert "12 or newer" in problem


def test_wal_level_problem_names_the_fix() -> None:
    problem = server_problem(150018, "15.18", "replica")
    assert problem == (
        'wal_level is "replica"; logical replication needs wal_level=logical '
        "(ALTER SYSTEM SET wal_level = logical; then restart the server)"
    )


def test_supported_server_has_no_problem() -> None:
    assert server_problem(120000, "12.0", "logical") is None
