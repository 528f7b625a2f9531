"""Reading a store's tables from outside it, on either backend: what is committed, through a connection of
the test's own (a SQLite file opened directly, or a PostgreSQL URL through psycopg)."""

import sqlite3

__all__ = ["rows", "run"]


def rows(location, sql, params=()):
    """Return the rows of ``sql`` (``?`` placeholders) on the database at ``location``, as tuples."""
    if location.startswith(("postgresql://", "postgres://")):
        import psycopg

        with psycopg.connect(location, autocommit=True, connect_timeout=10) as conn:
            return [tuple(r) for r in conn.execute(sql.replace("%", "%%").replace("?", "%s"), params).fetchall()]
    conn = sqlite3.connect(location, timeout=5)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def run(location, *statements):
    """Run statements (no parameters) on the database at ``location``, in one transaction, committed."""
    if location.startswith(("postgresql://", "postgres://")):
        import psycopg

        with psycopg.connect(location, connect_timeout=10) as conn:
            for statement in statements:
                conn.execute(statement)
        return
    conn = sqlite3.connect(location, timeout=5)
    try:
        with conn:
            for statement in statements:
                conn.execute(statement)
    finally:
        conn.close()
