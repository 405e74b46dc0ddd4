"""One-edit mutations and meaning-preserving rewrites of a gold SQL query, to test execution match.

A mutation changes one thing a wrong answer typically gets wrong (a literal, a comparison operator, a column, an
aggregate, the direction of an ORDER BY); execution match must score it wrong. A rewrite changes only the form
(reordered AND operands, table aliases, ``==`` for ``=``, identifier quoting and case, the literal's form);
execution match must score it right. Used by tests/eval/test_sql.py and by one-off measurements on real rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from sqlglot import exp
from sqlglot.tokens import Tokenizer, TokenType

from eval.sql_databases import (
    DIALECT,
    ColumnResolver,
    Table,
    clean_sql,
    context_schema,
    double_quoted_strings,
    number_cell,
    parse_one,
    schema_columns,
)

MUTATION_KINDS = ("literal", "operator", "column", "aggregate", "direction_limit", "direction")
REWRITE_KINDS = ("regenerated", "and_order", "alias", "eq_eq", "identifiers", "literal_form")

_SWAP_OPERATOR: dict[type[exp.Expression], type[exp.Expression]] = {
    exp.EQ: exp.NEQ, exp.NEQ: exp.EQ, exp.GT: exp.GTE, exp.GTE: exp.GT, exp.LT: exp.LTE, exp.LTE: exp.LT}
_FLIP_OPERATOR: dict[type[exp.Expression], type[exp.Expression]] = {
    exp.GT: exp.LT, exp.LT: exp.GT, exp.GTE: exp.LTE, exp.LTE: exp.GTE}
_SWAP_AGGREGATE: dict[type[exp.Expression], type[exp.Expression]] = {
    exp.Max: exp.Min, exp.Min: exp.Max, exp.Sum: exp.Avg, exp.Avg: exp.Sum}


def _parsed(gold: str, context: str) -> tuple[exp.Expression, tuple[Table, ...]]:
    text = clean_sql(gold)
    tables = context_schema(context)
    tree = parse_one(text)
    assert tree is not None and tables, f"gold or context does not parse: {gold!r} / {context!r}"
    return double_quoted_strings(tree, text, schema_columns(tables)), tables


def _sql(tree: exp.Expression) -> str:
    return tree.sql(dialect=DIALECT)


def _each(tree: exp.Expression, select: Callable[[exp.Expression], bool],
          change: Callable[[exp.Expression], exp.Expression | None]) -> Iterator[str]:
    """The query with one selected node changed, for each selected node (``change`` returns None to skip one)."""
    count = sum(1 for node in tree.walk() if select(node))
    for index in range(count):
        copy = tree.copy()
        node = [n for n in copy.walk() if select(n)][index]
        replacement = change(node)
        if replacement is not None:
            if replacement is not node:
                node.replace(replacement)
            yield _sql(copy)


def _changed_literal(node: exp.Expression) -> exp.Expression | None:
    assert isinstance(node, exp.Literal)
    if node.is_string:
        return exp.Literal.string(node.this + "x")
    cell = number_cell(node.this)
    if cell is None or cell.number is None:
        return None
    return exp.Literal.number(cell.number + 1)


def _in_plain_count(node: exp.Expression) -> bool:
    """Inside COUNT(col) without DISTINCT: on NULL-free data any column counts the same, so no real change."""
    count = node.find_ancestor(exp.Count)
    return count is not None and not isinstance(count.this, exp.Distinct)


def mutations(gold: str, context: str) -> list[tuple[str, str]]:
    """(kind, query) for every one-edit mutation of ``gold`` of the kinds in MUTATION_KINDS."""
    tree, tables = _parsed(gold, context)
    resolver = ColumnResolver(tree, tables)
    columns_of = {t.name.lower(): list(t.columns) for t in tables}
    out: list[tuple[str, str]] = []

    def literal(node: exp.Expression) -> bool:  # a value, not ORDER BY 1 or LIMIT 1
        return isinstance(node, exp.Literal) and not isinstance(node.parent, (exp.Ordered, exp.Limit))

    out += [("literal", q) for q in _each(tree, literal, _changed_literal)]
    out += [("operator", q) for q in _each(tree, lambda n: type(n) in _SWAP_OPERATOR,
                                           lambda n: _SWAP_OPERATOR[type(n)](this=n.this, expression=n.expression))]
    out += [("operator", q) for q in _each(tree, lambda n: type(n) in _FLIP_OPERATOR,
                                           lambda n: _FLIP_OPERATOR[type(n)](this=n.this, expression=n.expression))]

    def other_column(node: exp.Expression) -> exp.Expression | None:
        keys = resolver.resolve(node)  # type: ignore[arg-type]
        if len(keys) != 1:
            return None
        table, name = keys[0]
        others = [c for c in columns_of[table] if c.lower() != name]
        if not others:
            return None
        return exp.column(others[0], table=node.args.get("table"))

    out += [("column", q) for q in _each(tree, lambda n: isinstance(n, exp.Column) and not _in_plain_count(n),
                                         other_column)]
    out += [("aggregate", q) for q in _each(tree, lambda n: type(n) in _SWAP_AGGREGATE,
                                            lambda n: _SWAP_AGGREGATE[type(n)](this=n.this))]

    def count_distinct(node: exp.Expression) -> exp.Expression | None:
        inner = node.this
        if isinstance(inner, exp.Distinct):
            return exp.Count(this=inner.expressions[0])
        if isinstance(inner, exp.Column):
            return exp.Count(this=exp.Distinct(expressions=[inner.copy()]))
        return None

    out += [("aggregate", q) for q in _each(tree, lambda n: isinstance(n, exp.Count), count_distinct)]
    order = tree.args.get("order")
    if order is not None:
        kind = "direction_limit" if tree.args.get("limit") is not None else "direction"
        copy = tree.copy()
        first = copy.args["order"].expressions[0]
        desc = not first.args.get("desc")
        first.set("desc", desc)
        first.set("nulls_first", not desc)  # SQLite's default, so no NULLS clause is written
        out.append((kind, _sql(copy)))
    return out


def _swap_and(tree: exp.Expression) -> exp.Expression:
    copy = tree.copy()
    for node in list(copy.find_all(exp.And)):
        node.replace(exp.And(this=node.expression.copy(), expression=node.this.copy()))
    return copy


def _aliased(tree: exp.Expression) -> exp.Expression | None:
    """Aliases renamed (T1 -> "first alias" style names), or a single table given one and its columns qualified."""
    copy = tree.copy()
    tables = list(copy.find_all(exp.Table))
    aliased = [t for t in tables if t.alias]
    if aliased:
        names = {t.alias.lower(): f"alias_{i}" for i, t in enumerate(aliased)}
        for table in aliased:
            table.set("alias", exp.TableAlias(this=exp.to_identifier(names[table.alias.lower()])))
        for column in copy.find_all(exp.Column):
            if column.table and column.table.lower() in names:
                column.set("table", exp.to_identifier(names[column.table.lower()]))
        return copy
    if len({t.name.lower() for t in tables}) != 1 or len(tables) != 1:
        return None
    tables[0].set("alias", exp.TableAlias(this=exp.to_identifier("only_table")))
    for column in copy.find_all(exp.Column):
        if not column.table:
            column.set("table", exp.to_identifier("only_table"))
    return copy


def _token_rewrite(text: str, change: Callable[[object], str | None]) -> str:
    """``text`` with each token that ``change`` maps to a string replaced by it (positions from sqlglot)."""
    out, last = [], 0
    for token in Tokenizer().tokenize(text):
        new = change(token)
        if new is not None:
            out += [text[last:token.start], new]
            last = token.end + 1
    return "".join(out) + text[last:]


def _literal_forms(tree: exp.Expression, resolver: ColumnResolver) -> exp.Expression | None:
    """Literals compared directly with a column in their other form, 1907 <-> '1907', where that changes nothing:
    SQLite applies the column's affinity to the literal, and a TEXT column compares a number as SQLite writes it
    (12.90 as '12.9', so 12.90 <-> '12.9' is a rewrite while 12.90 <-> '12.90' is not)."""
    copy = tree.copy()
    changed = False
    for node in list(copy.find_all(exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE)):
        column, literal = node.this, node.expression
        if not (isinstance(column, exp.Column) and isinstance(literal, exp.Literal) and resolver.resolve(column)):
            continue
        cell = number_cell(literal.this)
        if cell is None:
            continue
        if not literal.is_string:
            literal.replace(exp.Literal.string(cell.text))
            changed = True
        elif cell.text == literal.this:
            literal.replace(exp.Literal.number(literal.this))
            changed = True
    return copy if changed else None


def rewrites(gold: str, context: str) -> list[tuple[str, str]]:
    """(kind, query) for meaning-preserving rewrites of ``gold`` of the kinds in REWRITE_KINDS."""
    tree, tables = _parsed(gold, context)
    resolver = ColumnResolver(tree, tables)
    out = [("regenerated", _sql(tree))]  # sqlglot's text: 'x' for "x", <> for !=, AS for aliases
    if tree.find(exp.And):
        out.append(("and_order", _sql(_swap_and(tree))))
    aliased = _aliased(tree)
    if aliased is not None:
        out.append(("alias", _sql(aliased)))
    text = clean_sql(gold)
    if any(t.token_type == TokenType.EQ for t in Tokenizer().tokenize(text)):
        out.append(("eq_eq", _token_rewrite(text, lambda t: "==" if t.token_type == TokenType.EQ else None)))
    names = {n.lower() for t in tables for n in (t.name, *t.columns)} | {
        t.alias.lower() for t in tree.find_all(exp.Table) if t.alias}
    out.append(("identifiers", _token_rewrite(
        text, lambda t: f"[{t.text.upper()}]" if t.token_type == TokenType.VAR and t.text.lower() in names
        else None)))
    forms = _literal_forms(tree, resolver)
    if forms is not None:
        out.append(("literal_form", _sql(forms)))
    return out


def main_table(gold: str, context: str) -> str:
    """The row's table: the first table the gold reads, else the context's first."""
    tree, tables = _parsed(gold, context)
    first = tree.find(exp.Table)
    return first.name if first is not None else tables[0].name


def template_answers(gold: str, context: str) -> dict[str, str]:
    """The constant answers a trivial baseline would give for this row."""
    table = main_table(gold, context)
    return {"select_star": f"SELECT * FROM {table}", "count_star": f"SELECT COUNT(*) FROM {table}"}
