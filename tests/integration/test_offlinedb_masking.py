"""Masking a copy: existing rows, rows written later by replicate, and all-or-nothing failures."""

from __future__ import annotations

import asyncio
from hashlib import md5
from pathlib import Path

import psycopg
import pytest

from pgcapture.offlinedb.masking import MaskingFailed, mask_copy

pytestmark = pytest.mark.integration

MASKS = {"public.users.email": "md5(email)", "public.users.secret": "NULL"}


async def setup(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("CREATE TABLE users (id int PRIMARY KEY, email text, secret text)")
        await conn.execute(
            "INSERT INTO users VALUES (1, 'a@example.com', 's1'), (2, 'b@x.org', 's2')"
        )


async def rows(dsn: str) -> list[tuple[object, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT id, email, secret FROM users ORDER BY id")
        return await cur.fetchall()


async def test_rows_are_masked_now_and_as_replicate_writes_them(dsn: str) -> None:
    await setup(dsn)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await mask_copy(conn, MASKS, [])
    masked = await rows(dsn)
    assert [r[1] for r in masked] == [
        md5(b"a@example.com").hexdigest(),
        md5(b"b@x.org").hexdigest(),
    ]
    assert [r[2] for r in masked] == [None, None]
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("SET session_replication_role = replica")  # as replicate applies
        await conn.execute("INSERT INTO users VALUES (3, 'c@example.com', 's3')")
        await conn.execute("UPDATE users SET email = 'new@example.com' WHERE id = 1")
    after = {r[0]: r for r in await rows(dsn)}
    assert after[3][1:] == (md5(b"c@example.com").hexdigest(), None)
    assert after[1][1] == md5(b"new@example.com").hexdigest()


async def test_a_failing_mask_or_script_changes_nothing(dsn: str, tmp_path: Path) -> None:
    await setup(dsn)
    before = await rows(dsn)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        with pytest.raises(MaskingFailed, match=r"mask of public.users .*no_such_function"):
            await mask_copy(conn, {"public.users.email": "no_such_function(email)"}, [])
        script = tmp_path / "drop_audit.sql"
        script.write_text("DELETE FROM users WHERE id = 2;\nSELECT 1/0;")
        with pytest.raises(
            MaskingFailed, match=r"masking script drop_audit.sql failed: division by zero"
        ):
            await mask_copy(conn, MASKS, [script])
        triggers = await (
            await conn.execute("SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal")
        ).fetchone()
    assert await rows(dsn) == before  # neither the masks nor the script's DELETE stayed
    assert triggers == (0,)


async def test_a_script_runs_after_the_masks(dsn: str, tmp_path: Path) -> None:
    await setup(dsn)
    script = tmp_path / "tidy.sql"
    script.write_text("DELETE FROM users WHERE id = 2;\nCREATE TABLE note (v text);")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await mask_copy(conn, MASKS, [script])
    assert [r[0] for r in await rows(dsn)] == [1]


def test_a_mask_must_name_schema_table_and_column() -> None:
    with pytest.raises(MaskingFailed, match=r"schema\.table\.column"):
        asyncio.run(mask_copy(None, {"users.email": "NULL"}, []))  # type: ignore[arg-type]
