"""Which tables a SQL statement reads and writes (the sql tool's lineage)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ledgerflow.tools.sql_tables import SqlTables, TableRef, tables_in


def names(tables: tuple[TableRef, ...]) -> list[str]:
    return [str(t) for t in tables]


CASES = [
    pytest.param(
        "SELECT o.id FROM orders o JOIN customers AS c ON c.id = o.customer_id "
        "LEFT OUTER JOIN regions r USING (region_id)",
        ["orders", "customers", "regions"],
        [],
        id="joins",
    ),
    pytest.param(
        "WITH recent AS (SELECT * FROM events WHERE at > now() - interval '1 day'), "
        "top AS (SELECT * FROM recent) SELECT * FROM top JOIN users ON true",
        ["events", "users"],
        [],
        id="ctes-are-not-tables",
    ),
    pytest.param(
        "WITH RECURSIVE tree AS (SELECT id FROM nodes UNION ALL "
        "SELECT n.id FROM nodes n JOIN tree t ON n.parent = t.id) SELECT * FROM tree",
        ["nodes"],
        [],
        id="recursive-cte",
    ),
    pytest.param(
        "SELECT (SELECT max(v) FROM metrics) AS top, coalesce((SELECT 1 FROM flags LIMIT 1), 0) "
        "FROM accounts WHERE id IN (SELECT account_id FROM blocked) "
        "AND EXISTS (SELECT 1 FROM audit.log l WHERE l.id = accounts.id)",
        ["metrics", "flags", "accounts", "blocked", "audit.log"],
        [],
        id="subqueries",
    ),
    pytest.param(
        "SELECT * FROM (SELECT * FROM raw.payments) p, LATERAL (SELECT * FROM refunds) r",
        ["raw.payments", "refunds"],
        [],
        id="derived-tables-and-lateral",
    ),
    pytest.param(
        'SELECT * FROM "Sales"."Order Lines" JOIN "weird ""name""" ON true JOIN MixedCase ON true',
        ["Sales.Order Lines", 'weird "name"', "mixedcase"],
        [],
        id="quoted-keep-case-unquoted-fold",
    ),
    pytest.param(
        "INSERT INTO public.daily (day, total) SELECT day, sum(amount) FROM ledger.entries "
        "GROUP BY day",
        ["ledger.entries"],
        ["public.daily"],
        id="insert-select",
    ),
    pytest.param(
        "INSERT INTO demo_emails (recipient, subject) VALUES (:to, 'x') "
        "ON CONFLICT (recipient) DO UPDATE SET subject = excluded.subject",
        [],
        ["demo_emails"],
        id="upsert",
    ),
    pytest.param(
        "UPDATE inventory SET reserved = reserved + 1 FROM reservations r "
        "WHERE r.sku = inventory.sku",
        ["reservations"],
        ["inventory"],
        id="update-from",
    ),
    pytest.param(
        "DELETE FROM ONLY stale USING keep WHERE stale.id = keep.id "
        "AND stale.at < (SELECT min(at) FROM horizon)",
        ["keep", "horizon"],
        ["stale"],
        id="delete-using",
    ),
    pytest.param(
        "MERGE INTO wh.stock AS t USING (SELECT sku, qty FROM staging.stock) s ON t.sku = s.sku "
        "WHEN MATCHED THEN UPDATE SET qty = s.qty "
        "WHEN NOT MATCHED THEN INSERT (sku, qty) VALUES (s.sku, s.qty)",
        ["staging.stock"],
        ["wh.stock"],
        id="merge",
    ),
    pytest.param(
        "insert into public.t(a) select id from x.user; -- trailing comment",
        ["x.user"],
        ["public.t"],
        id="call-like-column-list-and-keyword-name",
    ),
    pytest.param(
        "SELECT extract(year FROM created_at) FROM generate_series(1, 3) g, calendar",
        ["calendar"],
        [],
        id="functions-are-not-tables",
    ),
    pytest.param(
        "WITH src AS (SELECT * FROM a.src) INSERT INTO src SELECT * FROM src",
        ["a.src"],
        ["src"],
        id="write-to-a-table-named-like-a-cte",
    ),
    pytest.param(
        "UPDATE user SET seen = (SELECT count(*) FROM events WHERE events.uid = user.id)",
        ["events"],
        ["user"],
        id="names-the-parser-knows-as-keywords",
    ),
    pytest.param(
        "SELECT * FROM a JOIN b ON a.x IS DISTINCT FROM b.x FOR NO KEY UPDATE SKIP LOCKED",
        ["a", "b"],
        [],
        id="distinct-from-and-row-locks-are-not-tables",
    ),
]


@pytest.mark.parametrize(("statement", "reads", "writes"), CASES)
def test_tables_in(statement: str, reads: list[str], writes: list[str]) -> None:
    """Reads are FROM/JOIN/USING sources at any depth, CTE names excluded; writes are
    the INSERT/UPDATE/DELETE/MERGE targets; schema-qualified and quoted names kept."""
    found = tables_in(statement)
    assert names(found.inputs) == reads
    assert names(found.outputs) == writes


@pytest.mark.parametrize(
    "statement",
    ["", "   ", "this is not sql ((", "DO $$ BEGIN PERFORM 1; END $$", "VACUUM", "SELECT 1"],
)
def test_no_tables(statement: str) -> None:
    """A statement naming no table, or one the parser cannot read, gives no tables."""
    assert tables_in(statement) == SqlTables()


def test_schema_and_name_are_apart() -> None:
    """A qualified name keeps its schema apart from its table (for the asset URI)."""
    assert tables_in('UPDATE "My Schema".t SET a = 1').outputs == (
        TableRef(name="t", schema="My Schema"),
    )


def test_the_parser_is_not_imported_with_the_tools() -> None:
    """Importing the built-in tools (the DAG-parse path) does not import sqlparse."""
    code = "import sys, ledgerflow.tools.builtin; print('sqlparse' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
