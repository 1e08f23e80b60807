"""The types a PostgreSQL type is or holds, at any depth, as one recursive SQL query part.

Whether a column can travel in binary, or names database objects, depends not only on its type
but on every type inside it: array elements, a domain's base type, a range's or multirange's
subtype, a composite's attributes, nested to any depth. ``held_types`` is the one place that
walks them; capture (``capture/reader.py``, types whose values name objects) and the dumper
(``dump/dumper.py``, types without a binary send function) ask their questions of its rows.
"""

from __future__ import annotations


def held_types(roots: str) -> str:
    """A recursive CTE ``held(root, typ)``, for ``WITH RECURSIVE``: one row per type ``typ``
    that the type ``root`` is or holds. ``roots`` is a FROM item with one column ``r`` of type
    OIDs. A dropped composite attribute is a row with ``typ`` 0 (no such type)."""
    return f"""held(root, typ) AS (
    SELECT x.r, x.r FROM {roots}
  UNION
    SELECT h.root, s.typ
    FROM held AS h
    JOIN pg_catalog.pg_type AS t ON t.oid = h.typ
    CROSS JOIN LATERAL (
        SELECT t.typelem WHERE t.typelem <> 0
      UNION ALL
        SELECT t.typbasetype WHERE t.typbasetype <> 0
      UNION ALL
        SELECT g.rngsubtype FROM pg_catalog.pg_range AS g
        WHERE g.rngtypid = t.oid OR g.rngmultitypid = t.oid
      UNION ALL
        SELECT f.atttypid FROM pg_catalog.pg_attribute AS f
        WHERE t.typrelid <> 0 AND f.attrelid = t.typrelid AND f.attnum > 0
    ) AS s(typ)
)"""
