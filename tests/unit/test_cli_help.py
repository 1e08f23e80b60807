"""Every subcommand's ``--help`` shows examples, and every example parses with the real options;
``pgcapture version`` prints the versions, as lines or as JSON, and ``--version`` still works."""

from __future__ import annotations

import json
import shlex

import click
import pytest
from click.testing import CliRunner

from pgcapture import __version__
from pgcapture.cli.main import cli
from pgcapture.cli.version import libpq_version


def _commands(
    group: click.Group, prefix: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], click.Command]]:
    """Every command under ``group`` (groups included), by its path of names."""
    out: list[tuple[tuple[str, ...], click.Command]] = []
    for name, command in sorted(group.commands.items()):
        path = (*prefix, name)
        out.append((path, command))
        if isinstance(command, click.Group):
            out.extend(_commands(command, path))
    return out


COMMANDS = _commands(cli)
PATHS = [path for path, _ in COMMANDS]


def _help(path: tuple[str, ...]) -> str:
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    return result.stdout


def _examples(text: str) -> list[list[str]]:
    """The ``pgcapture ...`` lines of the help's "Examples:" block, continuation lines joined,
    split as a shell would."""
    lines = text.split("Examples:", 1)[1].split("\n\n", 1)[0].splitlines()
    commands: list[str] = []
    joined = ""
    for line in lines:
        joined += line.strip()
        if joined.endswith("\\"):
            joined = joined[:-1] + " "
            continue
        commands.append(joined)
        joined = ""
    return [
        words[1:]
        for words in (shlex.split(c, comments=True) for c in commands if c)
        if words[0] == "pgcapture"
    ]


def _parse(words: list[str]) -> None:
    """Parse ``pgcapture WORDS`` with the commands' own options, without running anything: an
    unknown option, a missing required one or a value of the wrong type raises."""
    command: click.Command = cli
    name = "pgcapture"
    while isinstance(command, click.Group):
        if words[0].startswith("-"):
            known = {opt for param in command.params for opt in param.opts}
            assert words[0] in known, f"{name} has no option {words[0]}"
            return
        name, words = words[0], words[1:]
        found = command.get_command(click.Context(command), name)
        assert found is not None, f"no subcommand {name!r}"
        command = found
    command.make_context(name, list(words))


def test_every_command_is_covered() -> None:
    names = {path[0] for path in PATHS}
    assert {"tail", "capture", "bootstrap", "replicate", "gateway", "controller"} <= names
    assert {"dumper", "dump", "version"} <= names
    assert {("dump", verb) for verb in ("schedule", "status", "pause", "resume", "stop")} <= set(
        PATHS
    )


@pytest.mark.parametrize("path", PATHS, ids=[" ".join(p) for p in PATHS])
def test_help_exits_0_and_shows_examples(path: tuple[str, ...]) -> None:
    text = _help(path)
    assert "Examples:" in text
    examples = _examples(text)
    assert examples, f"no `pgcapture ...` line among the examples of {' '.join(path)}"


@pytest.mark.parametrize("path", PATHS, ids=[" ".join(p) for p in PATHS])
def test_every_example_parses_with_the_real_options(path: tuple[str, ...]) -> None:
    for words in _examples(_help(path)):
        try:
            _parse(words)
        except click.ClickException as exc:
            pytest.fail(f"`pgcapture {shlex.join(words)}` does not parse: {exc.format_message()}")


def test_an_example_with_a_wrong_option_is_caught() -> None:
    with pytest.raises(click.NoSuchOption):
        _parse(["capture", "--source", "app", "--replica", "3"])
    with pytest.raises(click.BadParameter):
        _parse(["capture", "--source", "app", "--replicas", "2"])
    with pytest.raises(click.MissingParameter):
        _parse(["dump", "pause", "5f1c2a"])


def test_version_prints_one_component_per_line() -> None:
    result = CliRunner().invoke(cli, ["version"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    names = [line.split()[0] for line in lines]
    expected = ["pgcapture", "wire", "python", "psycopg", "libpq", "grpcio", "nats-py", "protobuf"]
    assert names == expected
    assert lines[0].split() == ["pgcapture", __version__]
    assert lines[1].split() == ["wire", "schema", "package", "pgcapture"]


def test_version_json_is_one_object_of_strings() -> None:
    result = CliRunner().invoke(cli, ["version", "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert found["pgcapture"] == __version__
    assert found["wire_schema"] == "pgcapture"
    keys = {"python", "psycopg", "libpq", "grpcio", "nats-py", "protobuf"}
    assert keys <= set(found)
    assert all(isinstance(v, str) and v for v in found.values())


def test_the_version_flag_still_prints_the_package_version() -> None:
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"pgcapture, version {__version__}"


def test_libpq_versions_are_written_as_postgresql_writes_them() -> None:
    assert libpq_version(180006) == "18.6"
    assert libpq_version(150012) == "15.12"
    assert libpq_version(90624) == "9.6.24"
