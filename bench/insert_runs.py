"""A run of inserts on the replica: ``INSERT ... SELECT unnest($1), ...`` against binary COPY.

replicate sends a run of inserts of one row shape as one statement with one binary array per
column. This measures that against ``COPY ... FROM STDIN (FORMAT binary)`` with the same rows
(values already in binary send format, as they come from the stream), on one throw-away
cluster: the time to build the payload in Python and the total time, medians of ``--repeat``.

    uv run python bench/insert_runs.py --rows 100000 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import struct
import time

import psycopg
from psycopg import pq

from pgcapture.local import LocalPostgres
from pgcapture.replica.plans import binary_array

_I32 = struct.Struct(">i")
ELEMENTS = (23, 23, 25, 1184, 701)  # int4, int4, text, timestamptz, float8
ARRAYS = (1007, 1007, 1009, 1185, 1022)
INSERT = (
    b"INSERT INTO bulk (id, a, b, c, d) "
    b"SELECT unnest($1), unnest($2), unnest($3), unnest($4), unnest($5)"
)


def rows(count: int) -> list[list[bytes]]:
    return [
        [_I32.pack(i), _I32.pack(i), b"text %d" % i, struct.pack(">q", i), struct.pack(">d", i)]
        for i in range(count)
    ]


def copy_payload(data: list[list[bytes]]) -> bytes:
    parts = [b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)]
    count = struct.pack(">h", len(ELEMENTS))
    for row in data:
        parts.append(count)
        parts.extend([_I32.pack(len(v)) + v for v in row])
    parts.append(b"\xff\xff")
    return b"".join(parts)


async def measure(count: int, repeat: int) -> None:
    data = rows(count)
    results: dict[str, list[tuple[float, float]]] = {"unnest": [], "copy": []}
    cluster = LocalPostgres.create()
    try:
        cluster.start()
        async with await psycopg.AsyncConnection.connect(cluster.dsn(), autocommit=True) as conn:
            await conn.execute(
                "CREATE TABLE bulk (id int PRIMARY KEY, a int, b text, c timestamptz, d float8)"
            )
            for _ in range(repeat):
                await conn.execute("TRUNCATE bulk")
                start = time.perf_counter()
                arrays = [binary_array(e, [r[i] for r in data]) for i, e in enumerate(ELEMENTS)]
                built = time.perf_counter() - start
                res = conn.pgconn.exec_params(INSERT, arrays, ARRAYS, [1] * len(arrays))
                assert res.status == pq.ExecStatus.COMMAND_OK, res.error_message
                results["unnest"].append((time.perf_counter() - start, built))
                await conn.execute("TRUNCATE bulk")
                start = time.perf_counter()
                payload = copy_payload(data)
                built = time.perf_counter() - start
                cur = conn.cursor()
                async with cur.copy("COPY bulk FROM STDIN (FORMAT binary)") as copy:
                    await copy.write(payload)
                results["copy"].append((time.perf_counter() - start, built))
    finally:
        cluster.destroy()
    print(f"{count:,} rows of 5 columns, medians of {repeat}\n")
    print("| method | total s | building the payload s | on the server s |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        total = statistics.median(t for t, _ in runs)
        built = statistics.median(b for _, b in runs)
        server = statistics.median(t - b for t, b in runs)
        print(f"| {name} | {total:.3f} | {built:.3f} | {server:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(measure(args.rows, args.repeat))


if __name__ == "__main__":
    main()
