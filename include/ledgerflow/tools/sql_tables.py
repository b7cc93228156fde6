"""The tables a SQL statement reads and writes, for lineage.

Parsed with ``sqlparse`` (in the lock through ``apache-airflow-providers-common-sql``),
imported on first use: never on the DAG-parse path. Writes are the targets of
``INSERT INTO``, ``UPDATE``, ``DELETE FROM``, ``MERGE INTO`` (and ``SELECT ... INTO``);
reads are what ``FROM``, ``JOIN`` and ``USING`` name, in subqueries too. Names defined
by ``WITH`` are not tables. Unquoted names fold to lower case (as Postgres does), quoted
ones keep theirs. A statement the parser cannot make sense of gives no tables: lineage
is a report, never a reason to fail a step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TableRef:
    """A table as the statement names it: ``schema`` is None when unqualified."""

    name: str
    schema: str | None = None

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}" if self.schema else self.name


@dataclass(frozen=True)
class SqlTables:
    inputs: tuple[TableRef, ...] = ()
    outputs: tuple[TableRef, ...] = ()


# Keywords after which the next name stays the one expected ("FROM ONLY t").
_PASS_THROUGH = frozenset({"ONLY", "LATERAL", "RECURSIVE"})
# Keywords that may follow FROM/INTO/UPDATE/JOIN/USING without being a table's name:
# any other keyword there is an unquoted name sqlparse knows as a word ("FROM events").
_STRUCTURAL = _PASS_THROUGH | {"SET", "DEFAULT", "VALUES", "ON", "USING", "WHERE", "INTO", "FROM"}


def tables_in(statement: str) -> SqlTables:
    """The tables ``statement`` (one or more statements) reads and writes, in order."""
    try:
        import sqlparse

        found = _Found()
        for parsed in sqlparse.parse(statement):
            _Scope(found).walk(parsed.tokens)
    except Exception:  # a parser's surprise is no lineage, not a failure
        return SqlTables()
    inputs = [t for t in found.inputs if t.schema is not None or t.name not in found.ctes]
    return SqlTables(inputs=_unique(inputs), outputs=_unique(found.outputs))


def _unique(tables: list[TableRef]) -> tuple[TableRef, ...]:
    return tuple(dict.fromkeys(tables))


class _Found:
    def __init__(self) -> None:
        self.inputs: list[TableRef] = []
        self.outputs: list[TableRef] = []
        self.ctes: set[str] = set()


class _Scope:
    """One SELECT/DML level: the statement itself or a parenthesised subquery."""

    def __init__(self, found: _Found) -> None:
        self.found = found
        self.expect: str | None = None  # "in" or "out": what the next name is
        self.dml: str | None = None
        self.cte = False
        self.prev: str | None = None  # the keyword just before, if the last token was one

    def walk(self, tokens: list[Any]) -> None:
        from sqlparse import sql
        from sqlparse import tokens as T

        for token in tokens:
            if token.is_whitespace or token.ttype in T.Comment or isinstance(token, sql.Comment):
                continue
            if token.ttype is T.Keyword.CTE:
                self.cte, self.expect = True, None
            elif token.ttype is T.Keyword.DML:
                self.dml = token.normalized
                # "FOR UPDATE", "FOR NO KEY UPDATE" lock rows; they name no target.
                writes = self.dml == "UPDATE" and self.prev not in ("FOR", "KEY")
                self.expect = "out" if writes else None
                self.cte = False
            elif token.ttype in T.Keyword and not (self.expect and _keyword_name(token)):
                self._keyword(token.normalized)
            elif self.cte and isinstance(token, sql.Identifier | sql.IdentifierList):
                self._ctes(token)
            elif self.expect and (
                isinstance(
                    token, sql.Identifier | sql.IdentifierList | sql.Function | sql.Parenthesis
                )
                or _keyword_name(token)
            ):
                self._references(token)
                self.expect = None
            elif token.is_group:
                _nested(token, self.found)
                if token.ttype is None and not isinstance(token, sql.Parenthesis):
                    self.expect = None
            else:
                self.expect = None
            self.prev = token.normalized if token.is_keyword else None

    def _keyword(self, word: str) -> None:
        if word in _PASS_THROUGH:
            return
        if word == "INTO":
            self.expect = "out"
        elif word == "FROM" and self.prev == "DISTINCT":  # "a IS DISTINCT FROM b"
            self.expect = None
        elif word == "FROM":
            self.expect = "out" if self.dml == "DELETE" else "in"
            if self.dml == "DELETE":
                self.dml = None  # a later FROM (a subquery's) reads
        elif word.endswith("JOIN") or word == "USING":
            self.expect = "in"
        else:
            self.expect = None

    def _ctes(self, token: Any) -> None:
        from sqlparse import sql

        items = token.get_identifiers() if isinstance(token, sql.IdentifierList) else [token]
        for item in items:
            if isinstance(item, sql.Identifier) and item.tokens:
                self.found.ctes.add(_part(item.tokens[0]))
            _nested(item, self.found)
        self.cte = False

    def _references(self, token: Any) -> None:
        from sqlparse import sql

        items = token.get_identifiers() if isinstance(token, sql.IdentifierList) else [token]
        for item in items:
            table = _table(item, writing=self.expect == "out")
            if table is None:
                _nested(item, self.found)
            elif self.expect == "out":
                self.found.outputs.append(table)
            else:
                self.found.inputs.append(table)


def _nested(token: Any, found: _Found) -> None:
    """Walk the subqueries anywhere inside ``token`` (``WHERE x IN (SELECT ...)``)."""
    from sqlparse import sql

    if isinstance(token, sql.Parenthesis) and _is_query(token):
        _Scope(found).walk(token.tokens[1:-1])
        return
    if token.is_group:
        for child in token.tokens:
            if child.is_group:
                _nested(child, found)


def _is_query(paren: Any) -> bool:
    from sqlparse import tokens as T

    for token in paren.tokens[1:]:
        if token.is_whitespace:
            continue
        return token.ttype is T.Keyword.DML or token.ttype is T.Keyword.CTE
    return False


def _keyword_name(token: Any) -> bool:
    from sqlparse import tokens as T

    return (
        not token.is_group
        and token.is_keyword
        and token.ttype is not T.Keyword.DML
        and token.ttype is not T.Keyword.CTE
        and token.normalized not in _STRUCTURAL
    )


def _table(item: Any, *, writing: bool) -> TableRef | None:
    """The table an identifier names, or None (a subquery, a function call)."""
    from sqlparse import sql
    from sqlparse import tokens as T

    if _keyword_name(item):
        return TableRef(name=_part(item))

    if isinstance(item, sql.Function):
        # "INSERT INTO t (a, b)" groups as a call; "FROM generate_series(...)" is one.
        head = item.tokens[0] if writing and item.tokens else None
        return _table(head, writing=True) if isinstance(head, sql.Identifier) else None
    if not isinstance(item, sql.Identifier):
        return None
    parts: list[str] = []
    after_dot = False
    for token in item.tokens:
        if token.ttype is T.Punctuation and token.value == ".":
            after_dot = True
            continue
        if (
            token.ttype in T.Name
            or token.ttype in T.String.Symbol
            or (after_dot and token.is_keyword)
        ):
            parts.append(_part(token))
            after_dot = False
        elif isinstance(token, sql.Function) and writing:
            # "INSERT INTO public.t(a)" groups the last part with its column list.
            inner = token.tokens[0] if token.tokens else None
            if isinstance(inner, sql.Identifier):
                inner = inner.tokens[0]
            if inner is not None and not inner.is_group:
                parts.append(_part(inner))
            break
        else:
            break  # an alias, AS, a parenthesis: the name is over
        if len(parts) > 3:
            return None
    if not parts:
        return None
    return TableRef(name=parts[-1], schema=parts[-2] if len(parts) > 1 else None)


def _part(token: Any) -> str:
    value = str(token.value)
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1].replace('""', '"')
    return value.lower()
