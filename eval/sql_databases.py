"""Synthesised databases for SQL execution match, after the distilled test-suite evaluation of Zhong, Yu and Klein
(EMNLP 2020, "Semantic Evaluation for Text-to-SQL with Distilled Test Suites").

A text-to-SQL row gives only CREATE TABLE statements. On their empty tables nearly every valid SELECT returns the
same nothing, so "same result as the gold query" says almost nothing (a constant ``SELECT * FROM t`` scored about
0.8). Here each row gets ``N_DATABASES`` small databases ("fills") of the context's tables, filled with generated
rows whose values are built from the gold query:

- every literal the gold query compares a column with (``= 'Alabama'``, ``> 56``, ``LIKE '%Ha%'``,
  ``BETWEEN 10 AND 15``) is a frequent value of that column, so the gold's WHERE clauses select something, and its
  neighbours (56 -> 55, 57; 'Alabama' -> 'ALABAMA', 'Alabamax'; a LIKE pattern -> strings that match and strings
  that nearly match) are present too, so a changed literal or operator selects something else;
- values repeat, so DISTINCT, GROUP BY and COUNT change results; fills differ in how much (from a couple of
  values per column to nearly unique keys), in how skewed the draws are and in how often the literals occur;
- columns the gold query compares with each other (join keys, ``IN (SELECT ...)``, the columns of a UNION /
  INTERSECT / EXCEPT) and columns of the same name share one pool of values, so joins match rows and ``NOT IN``
  keeps some; a ``HAVING COUNT(*) >= N`` gets one group of N-1, N or N+1 rows;
- a column compared with a number, summed or averaged holds numbers; other columns hold words; no NULLs;
- the literals of the prediction being scored join the pools too (not made frequent), so a threshold the gold
  never mentions (``age > 1``) meets data on both sides of it;
- each value is stored as SQLite would store the gold's literal in that column: sql-create-context declares every
  column VARCHAR and compares it with numbers (``WHERE year > 1907``), so there ``1907`` is stored as the text
  '1907' and the comparison is SQLite's text comparison, exactly as it would be on a real table of that schema.

A prediction matches only if its result equals the gold's on every fill (eval.sql). Fills are deterministic:
seeded from the context, the gold query and the fill's index, so every model is scored on the same databases.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import random
import re
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

DIALECT = "sqlite"

# Why 8 databases of 12 rows per table: with values built from the gold's literals, most wrong queries already
# differ on the first fill; 8 fills scored 98 % of the one-edit mutations (a literal, an operator, a column, an
# aggregate, ASC/DESC) of the real sql-create-context rows 0-99 wrong and 99.9 % of those of 1,176 WikiSQL rows,
# and most of the rest are equivalent to the gold under SQLite's text comparison of VARCHAR columns. 12 or 16
# fills, or 20 rows per table, gained under half a point (measured; tests/eval/test_sql.py holds the bar on a
# sample written for it). A dozen rows keeps a cross join of three tables at 1,728 rows, far below the sandbox's
# row and time limits: scoring one prediction takes milliseconds, and a wrong one stops at its first mismatch.
N_DATABASES = 8
ROWS_PER_TABLE = 12
# A gold ``HAVING COUNT(*) >= N`` needs a group of about N rows to select anything; tables grow up to this many.
MAX_ROWS_PER_TABLE = 400
# How many random values a column's pool gets besides the gold's literals, one choice per fill: from heavy
# repetition (2) to nearly unique keys (12 = ROWS_PER_TABLE).
FILLER_COUNTS = (2, 3, 4, 6, 8, 12)

ColumnKey = tuple[str, str]  # (table, column), lower-case: SQLite identifiers are case-insensitive
_SYLLABLES = ("ka", "lo", "mi", "ren", "sa", "to", "vi", "zu", "ber", "dan", "el", "fo", "gi", "ho", "jun", "pe")


# ---------------------------------------------------------------------------------------------- the schema
@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[str, ...]
    declared: tuple[str, ...]  # each column's declared type, as written ("VARCHAR", "INTEGER", "")
    affinities: tuple[str, ...]  # SQLite type affinity of each column: INTEGER, REAL, NUMERIC, TEXT or BLOB

    def create_sql(self) -> str:
        """CREATE TABLE with the same names and declared types but no constraints: generated rows repeat values
        on purpose, which a PRIMARY KEY or UNIQUE would refuse."""
        columns = ", ".join(f"{quote_identifier(c)} {d}".strip() for c, d in zip(self.columns, self.declared,
                                                                                  strict=True))
        return f"CREATE TABLE {quote_identifier(self.name)} ({columns})"


def type_affinity(declared: str) -> str:
    """SQLite's affinity of a declared column type (https://sqlite.org/datatype3.html, section 3.1), in order."""
    upper = declared.upper()
    if "INT" in upper:
        return "INTEGER"
    if any(word in upper for word in ("CHAR", "CLOB", "TEXT")):
        return "TEXT"
    if not upper or "BLOB" in upper:
        return "BLOB"
    if any(word in upper for word in ("REAL", "FLOA", "DOUB")):
        return "REAL"
    return "NUMERIC"


@lru_cache(maxsize=4096)
def context_schema(context: str) -> tuple[Table, ...] | None:
    """The tables the context's CREATE TABLE statements make, as SQLite itself parses them; None if they fail.

    The context comes from the dataset (trusted), so it runs unsandboxed on a throw-away in-memory database.
    """
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript(context)
        names = [row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY rowid")]
        tables = []
        for name in names:
            info = conn.execute(f"PRAGMA table_info({quote_identifier(name)})").fetchall()
            declared = tuple(r[2] or "" for r in info)
            tables.append(Table(name, tuple(r[1] for r in info), declared, tuple(map(type_affinity, declared))))
        return tuple(tables)
    except sqlite3.Error:
        return None
    finally:
        conn.close()


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def schema_columns(tables: Iterable[Table]) -> frozenset[str]:
    """Every column name of the schema, lower-case."""
    return frozenset(c.lower() for t in tables for c in t.columns)


# ---------------------------------------------------------------------------------------------- reading the gold
def clean_sql(query: str) -> str:
    """The SQL to run or parse: stripped, without a trailing run of ``!`` (Ludwig's id-0 padding decodes to ``!``
    with Qwen2.5 and Llama 3 tokenizers; a trailing ``!`` is never valid SQL) and without trailing semicolons."""
    text = query.strip()
    while text.endswith(("!", ";")):
        text = text.rstrip("!").rstrip().rstrip(";").rstrip()
    return text


def parse_one(text: str) -> exp.Expression | None:
    """The single statement in ``text`` (already :func:`clean_sql`) parsed by sqlglot (SQLite dialect), or None."""
    if not text:
        return None
    try:
        expressions = sqlglot.parse(text, read=DIALECT)
    except (SqlglotError, RecursionError):  # RecursionError: CONCAT( nested 41 deep (SmolLM2)
        return None
    if len(expressions) != 1 or expressions[0] is None:
        return None
    return expressions[0]


def _double_quoted(identifier: exp.Identifier, text: str) -> bool:
    start = identifier.meta.get("start")
    return identifier.quoted and isinstance(start, int) and text[start:start + 1] == '"'


def double_quoted_strings(tree: exp.Expression, text: str, columns: frozenset[str] | None) -> exp.Expression:
    """``tree`` with each double-quoted name that SQLite would read as a string literal made a string literal.

    SQLite reads ``"abc"`` as the identifier abc when a column (or result alias) of that name exists, and as the
    string 'abc' otherwise; sql-create-context writes most string values that way (``WHERE name = "Bob"``). sqlglot
    always reads it as a column, which would lose the value (and fold its case). ``text`` is the SQL the tree was
    parsed from (to tell ``"x"`` from ``[x]`` and `` `x` ``, which are always identifiers); ``columns`` are the
    schema's lower-case column names, or None when the schema is unknown: then every unqualified double-quoted
    name is taken as a string (SQLite's reading whenever no such column exists).
    """
    aliases = {a.alias.lower() for a in tree.find_all(exp.Alias) if a.alias}
    known = None if columns is None else columns | aliases
    for column in list(tree.find_all(exp.Column)):
        identifier = column.this
        if column.table or not isinstance(identifier, exp.Identifier) or not _double_quoted(identifier, text):
            continue
        if known is None or identifier.this.lower() not in known:
            column.replace(exp.Literal.string(identifier.this))
    return tree


@dataclass(frozen=True)
class Literal:
    """A value the gold query compares a column with, as written (``text``), and how to read it."""

    text: str
    is_string: bool
    pattern: str = ""  # "like" or "glob" when the literal is a LIKE/GLOB pattern


@dataclass
class GoldFacts:
    """What the gold query says about the values the fills need."""

    literals: dict[ColumnKey, set[Literal]] = field(default_factory=dict)
    links: set[tuple[ColumnKey, ColumnKey]] = field(default_factory=set)  # columns compared with each other
    numeric: set[ColumnKey] = field(default_factory=set)  # summed, averaged or used in arithmetic
    count_literals: set[int] = field(default_factory=set)  # N of ``COUNT(...) > N`` (groups need ~N rows)
    grouped: set[ColumnKey] = field(default_factory=set)  # GROUP BY columns
    ordered: set[ColumnKey] = field(default_factory=set)  # ORDER BY columns (plain columns only)
    probes: dict[ColumnKey, set[Literal]] = field(default_factory=dict)  # a prediction's literals (fills_for)


_COMPARISONS = (exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.NullSafeEQ, exp.NullSafeNEQ, exp.Like,
                exp.ILike, exp.Glob)
_NUMERIC_USES = (exp.Sum, exp.Avg, exp.Add, exp.Sub, exp.Mul, exp.Div, exp.Mod)


class ColumnResolver:
    """Column references of one query -> schema columns (through table aliases; unqualified by name)."""

    def __init__(self, tree: exp.Expression, tables: tuple[Table, ...]) -> None:
        self.columns = {t.name.lower(): {c.lower() for c in t.columns} for t in tables}
        self.aliases: dict[str, set[str]] = {}
        for table in tree.find_all(exp.Table):
            name = table.name.lower()
            self.aliases.setdefault(table.alias_or_name.lower(), set()).add(name)
            self.aliases.setdefault(name, set()).add(name)
        self.in_query = {n for names in self.aliases.values() for n in names}

    def resolve(self, column: exp.Column) -> list[ColumnKey]:
        name = column.name.lower()
        if column.table:
            tables = self.aliases.get(column.table.lower(), {column.table.lower()})
        else:
            tables = {t for t in self.in_query if name in self.columns.get(t, ())} or set(self.columns)
        return sorted((t, name) for t in tables if name in self.columns.get(t, ()))

    def columns_of(self, node: exp.Expression) -> list[ColumnKey]:
        """Schema columns a value expression stands for; a subquery stands for its first result column."""
        if isinstance(node, exp.Subquery):
            node = node.this
        if isinstance(node, exp.Query):
            selects = node.selects if isinstance(node, exp.Select) else []
            return self.columns_of(selects[0]) if selects else []
        if isinstance(node, exp.Column):
            return self.resolve(node)
        return [key for column in node.find_all(exp.Column) for key in self.resolve(column)]


def literal_of(node: exp.Expression) -> Literal | None:
    """A literal operand (``5``, ``-5``, ``'x'``, parenthesised), or None."""
    while isinstance(node, exp.Paren):
        node = node.this
    if isinstance(node, exp.Neg) and isinstance(node.this, exp.Literal) and not node.this.is_string:
        return Literal("-" + node.this.this, False)
    if isinstance(node, exp.Literal):
        return Literal(node.this, node.is_string)
    return None


@lru_cache(maxsize=4096)
def gold_facts(gold: str, tables: tuple[Table, ...]) -> GoldFacts:
    """Literals per column, linked columns, numeric columns and COUNT thresholds of the gold query (empty facts
    when sqlglot cannot parse it: the fills are then random but still typed). Cached: treat as read-only."""
    facts = GoldFacts()
    text = clean_sql(gold)
    tree = parse_one(text)
    if tree is None:
        return facts
    tree = double_quoted_strings(tree, text, schema_columns(tables))
    resolver = ColumnResolver(tree, tables)

    def add_literal(node: exp.Expression, literal: Literal) -> None:
        count = number_cell(literal.text) if isinstance(node, exp.Count) and not literal.is_string else None
        if count is not None and count.number is not None and abs(count.number) < MAX_ROWS_PER_TABLE:
            facts.count_literals.add(max(0, int(count.number)))
        for key in resolver.columns_of(node):
            facts.literals.setdefault(key, set()).add(literal)

    def link(left: exp.Expression, right: exp.Expression) -> None:
        for a in resolver.columns_of(left):
            for b in resolver.columns_of(right):
                facts.links.add((a, b))

    for node in tree.find_all(*_COMPARISONS):
        pattern = "glob" if isinstance(node, exp.Glob) else "like" if isinstance(node, (exp.Like, exp.ILike)) else ""
        left, right = node.this, node.expression
        left_literal, right_literal = literal_of(left), literal_of(right)
        if right_literal is not None and left_literal is None:
            add_literal(left, Literal(right_literal.text, right_literal.is_string, pattern))
        elif left_literal is not None and right_literal is None:
            add_literal(right, left_literal)
        elif left_literal is None and right_literal is None:
            link(left, right)
    for node in tree.find_all(exp.Between):
        for bound in (node.args.get("low"), node.args.get("high")):
            literal = literal_of(bound) if bound is not None else None
            if literal is not None:
                add_literal(node.this, literal)
    for node in tree.find_all(exp.In):
        for item in node.expressions:
            literal = literal_of(item)
            if literal is not None:
                add_literal(node.this, literal)
            else:
                link(node.this, item)
        if node.args.get("query") is not None:
            link(node.this, node.args["query"])
    for operation in tree.find_all(exp.SetOperation):  # UNION / INTERSECT / EXCEPT compare columns by position
        left, right = operation.this, operation.expression
        if isinstance(left, exp.Query) and isinstance(right, exp.Query):
            for a, b in zip(left.selects, right.selects, strict=False):
                link(a, b)
    for ordered in tree.find_all(exp.Ordered):
        if isinstance(ordered.this, exp.Column):
            facts.ordered.update(resolver.resolve(ordered.this))
    for group in tree.find_all(exp.Group):
        for column in group.find_all(exp.Column):
            facts.grouped.update(resolver.resolve(column))
    for node in tree.find_all(*_NUMERIC_USES):
        for column in node.find_all(exp.Column):
            facts.numeric.update(resolver.resolve(column))
    return facts


# ---------------------------------------------------------------------------------------------- values
@dataclass(frozen=True)
class Cell:
    """One generated value: its text, and its number when it is one (stored as a number in numeric columns)."""

    text: str
    number: int | float | None = None

    def stored(self, affinity: str) -> str | int | float:
        """The value as inserted: text in a TEXT column (as the gold's literal is written), else the number."""
        return self.text if affinity == "TEXT" or self.number is None else self.number


_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


@lru_cache(maxsize=65536)
def _sqlite_number(literal: str) -> tuple[int | float, str] | None:
    """SQLite's value of a numeric literal and its text form (what a TEXT column compares it as: ``12.90`` ->
    '12.9', ``1e3`` -> '1000.0'), computed by SQLite itself; None when ``literal`` is no number."""
    if not _NUMBER.fullmatch(literal.strip()):
        return None
    conn = sqlite3.connect(":memory:")
    try:
        value, text = conn.execute(f"SELECT {literal.strip()}, CAST({literal.strip()} AS TEXT)").fetchone()
    except (sqlite3.Error, OverflowError):
        return None
    finally:
        conn.close()
    return (value, text) if isinstance(value, (int, float)) and math.isfinite(value) else None


def number_cell(literal: str) -> Cell | None:
    """A numeric literal as SQLite reads it (its value, and its text in a TEXT column), or None."""
    parsed = _sqlite_number(literal)
    return None if parsed is None else Cell(parsed[1], parsed[0])


def _cell(number: float, decimals: int) -> Cell:
    """A generated number (rounded to ``decimals``; 0: an integer) with SQLite's text form of it."""
    value: int | float = int(round(number)) if decimals == 0 else round(number, decimals)
    if decimals == 0 and abs(value) >= 2 ** 63:
        value = float(value)
    return number_cell(repr(value)) or Cell(repr(value), value)


def _decimals(text: str) -> int:
    """Digits after the point of a literal as written (``37.5`` -> 1); 0 for integers and exponent forms."""
    return len(text.split(".", 1)[1]) if "." in text and "e" not in text.lower() else 0


def numeric_neighbours(literal: str, cell: Cell, rng: random.Random) -> list[Cell]:
    """Values next to a number (one step either side, both sides of a decimal), one of another magnitude, and the
    literal as written when SQLite writes it otherwise (``12.90``), so a changed literal or operator, or a
    text-vs-number comparison, selects different rows."""
    assert cell.number is not None
    decimals = _decimals(literal)
    step = 10.0 ** -decimals
    out = [_cell(cell.number - step, decimals), _cell(cell.number + step, decimals)]
    if decimals:
        out += [_cell(math.floor(cell.number), 0), _cell(math.ceil(cell.number), 0)]
    magnitude = max(10.0, abs(float(cell.number)))
    out.append(_cell(cell.number + rng.choice((-1, 1)) * rng.uniform(0.2, 2.0) * magnitude, decimals))
    out.append(_cell(cell.number * 10, decimals))  # '500' sorts between '50' and '51' as text
    if literal.strip() != cell.text:
        out.append(Cell(literal.strip()))
    return out


def string_neighbours(text: str) -> list[Cell]:
    """Strings next to a string literal: another case (``=`` is case-sensitive, LIKE is not) and a longer string
    that contains it (``=`` vs ``LIKE '%x%'``)."""
    other_case = text.upper() if text != text.upper() else text.lower()
    return [Cell(v) for v in dict.fromkeys((other_case, text + "x")) if v != text]


def pattern_values(pattern: str, kind: str, rng: random.Random) -> list[Cell]:
    """Strings a LIKE (``%``, ``_``) or GLOB (``*``, ``?``) pattern matches, one it nearly matches (a literal
    character of the pattern changed), and the pattern itself (``=`` vs LIKE)."""
    many, one = ("*", "?") if kind == "glob" else ("%", "_")

    def instance(source: str, fill: str) -> str:
        return "".join(fill if ch == many else rng.choice("abcxyz") if ch == one else ch for ch in source)

    values = [instance(pattern, ""), instance(pattern, rng.choice(("q", "Zo", "12")))]
    literal_positions = [i for i, ch in enumerate(pattern) if ch.isalnum()]
    if literal_positions:
        i = rng.choice(literal_positions)
        changed = "7" if pattern[i] != "7" else "8"
        values.append(instance(pattern[:i] + changed + pattern[i + 1:], ""))
    values.append(pattern)
    return [Cell(v) for v in dict.fromkeys(values) if v]


def random_word(rng: random.Random) -> str:
    word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3)))
    return word.capitalize() if rng.random() < 0.5 else word


# ---------------------------------------------------------------------------------------------- domains
@dataclass
class Domain:
    """Columns that share one pool of values (same name, or compared with each other in the gold query)."""

    members: list[ColumnKey] = field(default_factory=list)
    literals: set[Literal] = field(default_factory=set)
    probes: set[Literal] = field(default_factory=set)  # present with their neighbours, but not made frequent
    numeric: bool = False
    real: bool = False


def domains_of(tables: tuple[Table, ...], facts: GoldFacts) -> dict[ColumnKey, Domain]:
    """Each column's domain: a union-find over same-name columns and the gold's column-to-column comparisons."""
    parent: dict[ColumnKey, ColumnKey] = {}

    def find(key: ColumnKey) -> ColumnKey:
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    affinity: dict[ColumnKey, str] = {}
    by_name: dict[str, ColumnKey] = {}
    for table in tables:
        for column, aff in zip(table.columns, table.affinities, strict=True):
            key = (table.name.lower(), column.lower())
            parent.setdefault(key, key)
            affinity[key] = aff
            first = by_name.setdefault(key[1], key)
            parent[find(key)] = find(first)
    for a, b in facts.links:
        if a in parent and b in parent:
            parent[find(a)] = find(b)
    roots: dict[ColumnKey, Domain] = {}
    for key in parent:
        domain = roots.setdefault(find(key), Domain())
        domain.members.append(key)
        domain.literals |= facts.literals.get(key, set())
        domain.probes |= facts.probes.get(key, set())
        numeric_literal = any(not lit.is_string for lit in facts.literals.get(key, ()))
        domain.numeric |= affinity[key] in ("INTEGER", "REAL", "NUMERIC") or key in facts.numeric or numeric_literal
        domain.real |= affinity[key] == "REAL" or any(
            not lit.is_string and _decimals(lit.text) for lit in facts.literals.get(key, ()))
    return {key: roots[find(key)] for key in parent}


def _filler(domain: Domain, rng: random.Random, centres: list[Cell]) -> Cell:
    if not domain.numeric:
        return Cell(random_word(rng))
    decimals = 1 if domain.real else 0
    if centres:
        centre = float(rng.choice(centres).number or 0)
        spread = max(5.0, abs(centre))
        return _cell(centre + rng.uniform(-spread, spread), decimals)
    return _cell(rng.uniform(0, 100), decimals)


@dataclass(frozen=True)
class Pool:
    """A domain's values for one fill and how often each is drawn."""

    values: tuple[Cell, ...]
    weights: tuple[float, ...]
    cumulative: tuple[float, ...] = ()  # running sums of ``weights`` (set on creation): one draw is a bisection

    def __post_init__(self) -> None:
        object.__setattr__(self, "cumulative", tuple(itertools.accumulate(self.weights)))

    def draw(self, rng: random.Random, avoid: Cell | None = None) -> Cell:
        """One value by weight, never ``avoid`` (unless it is the only value)."""
        if avoid is None:
            return rng.choices(self.values, cum_weights=self.cumulative, k=1)[0]
        choices = [(v, w) for v, w in zip(self.values, self.weights, strict=True) if v != avoid] or [
            (self.values[0], 1.0)]
        return rng.choices([v for v, _ in choices], weights=[w for _, w in choices], k=1)[0]

    @property
    def top(self) -> Cell:
        return max(zip(self.weights, range(len(self.values)), self.values))[2]


def _values_of(literal: Literal, rng: random.Random) -> tuple[list[Cell], list[Cell]]:
    """(the literal as stored values, its neighbours)."""
    if literal.pattern:
        values = pattern_values(literal.text, literal.pattern, rng)
        return values[:2], values[2:]
    number = None if literal.is_string else number_cell(literal.text)
    if number is None:
        return [Cell(literal.text)], string_neighbours(literal.text)
    return [number], numeric_neighbours(literal.text, number, rng)


def literal_values(domain: Domain, rng: random.Random) -> tuple[list[Cell], list[Cell]]:
    """(the gold's literals as stored values, their neighbours and the probes with theirs) for one domain."""
    exact: list[Cell] = []
    near: list[Cell] = []
    order = (lambda lit: (lit.text, lit.is_string, lit.pattern))  # noqa: E731 - sets have no stable order
    for literal in sorted(domain.literals, key=order):
        values, neighbours = _values_of(literal, rng)
        exact += values
        near += neighbours
    for literal in sorted(domain.probes - domain.literals, key=order):
        values, neighbours = _values_of(literal, rng)
        near += values + neighbours
    return exact, near


def domain_pool(domain: Domain, rng: random.Random) -> Pool:
    """The domain's values for one fill: the gold's literals, their neighbours and random fillers of the domain's
    kind. Fills differ on purpose in how many fillers there are (few: joins match and groups are large; many:
    keys are nearly unique), in how skewed the draws are, and in how often the literals occur (so a WHERE
    selects many rows in one fill and few in another): a wrong query that agrees with the gold on one shape of
    data rarely agrees on all of them."""
    exact, near = literal_values(domain, rng)
    centres = [c for c in exact if c.number is not None]
    fillers = [_filler(domain, rng, centres) for _ in range(rng.choice(FILLER_COUNTS))]
    rng.shuffle(exact)
    rest = near + fillers
    rng.shuffle(rest)
    exact = list({c.text: c for c in exact}.values())
    rest = [c for c in {c.text: c for c in rest}.values() if c.text not in {e.text for e in exact}]
    literal_share = rng.uniform(0.15, 0.6) if exact and rest else 1.0 if exact else 0.0
    skew = rng.choice((0.0, 0.7, 1.5))
    rest_weights = [1.0 / (rank + 1) ** skew for rank in range(len(rest))]
    total = sum(rest_weights) or 1.0
    weights = [literal_share / max(1, len(exact))] * len(exact) + [
        (1 - literal_share) * w / total for w in rest_weights]
    return Pool(tuple(exact + rest), tuple(weights))


# ---------------------------------------------------------------------------------------------- fills
Fill = tuple[tuple[Table, tuple[tuple[str | int | float, ...], ...]], ...]


def fill_seed(context: str, gold: str, index: int) -> int:
    """A seed from the row itself, so fills are the same in every run, process and model."""
    digest = hashlib.sha256(f"{context}\x00{gold}\x00{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def group_target(facts: GoldFacts, rng: random.Random) -> int | None:
    """For a gold ``GROUP BY ... HAVING COUNT(...) > N``: the size (N-1, N or N+1) of one group this fill makes,
    so ``>`` vs ``>=`` and N vs N+1 give different results; None when the gold has no such threshold."""
    if not (facts.count_literals and facts.grouped):
        return None
    return max(0, min(MAX_ROWS_PER_TABLE - ROWS_PER_TABLE, max(facts.count_literals) + rng.choice((-1, 0, 1))))


def is_key_column(table: str, column: str) -> bool:
    """Whether a column is, by its name, its own table's key: ``id``, or ``<table>_id`` with the table's name in
    the singular or plural or a suffix of it (``students.student_id``, ``city.City_ID``, ``farm_competition.
    Competition_ID``). A real database has each key once; with repeated keys, a query that groups by the key and
    shows another column of the row (Spider's ``GROUP BY T1.id`` ... ``SELECT T1.name``) picks any of several rows,
    and two equivalent queries would disagree."""
    name, table = column.lower(), table.lower()
    if name == "id":
        return True
    stem = name.removesuffix("id").rstrip("_")
    return name.endswith("id") and bool(stem) and any(
        t.endswith(stem) for t in (table, table.removesuffix("s"), table.removesuffix("es")))


def distinct_values(pool: Pool, domain: Domain, count: int, rng: random.Random) -> list[Cell]:
    """``count`` different values, the pool's frequent ones most likely among them, topped up with new ones."""
    order = sorted(range(len(pool.values)), reverse=True,
                   key=lambda i: rng.random() ** (1.0 / pool.weights[i]) if pool.weights[i] > 0 else 0.0)
    values = [pool.values[i] for i in order][:count]
    taken = {v.text for v in values}
    while len(values) < count:
        cell = _filler(domain, rng, [])
        if cell.text in taken:
            cell = Cell(f"{cell.text}{len(values)}") if cell.number is None else _cell(
                max((v.number or 0) for v in values) + 1 + len(values), 1 if domain.real else 0)
        if cell.text not in taken:
            taken.add(cell.text)
            values.append(cell)
    rng.shuffle(values)
    return values


def make_fill(tables: tuple[Table, ...], facts: GoldFacts, rng: random.Random) -> Fill:
    """One database's rows: every column drawn from its domain's pool for this fill, except that

    - a key column (:func:`is_key_column`) and a column the gold orders by (unless grouped) hold each value
      once: ties under ``ORDER BY x LIMIT 1`` or a repeated key would let two equivalent queries pick different
      rows;
    - with a ``HAVING COUNT(...)`` threshold, the first rows of each table share one value in the columns of a
      grouped domain (one group of exactly the target size).
    """
    domains = domains_of(tables, facts)
    pools: dict[int, Pool] = {}
    for domain in domains.values():
        if id(domain) not in pools:
            pools[id(domain)] = domain_pool(domain, rng)
    target = group_target(facts, rng)
    grouped_domains = {id(domains[k]) for k in facts.grouped if k in domains}
    rows = ROWS_PER_TABLE + (target or 0)
    filled = []
    for table in tables:
        columns = []
        for column in table.columns:
            key = (table.name.lower(), column.lower())
            domain, pool = domains[key], pools[id(domains[key])]
            if is_key_column(table.name, column) or (key in facts.ordered and key not in facts.grouped):
                columns.append(distinct_values(pool, domain, rows, rng))
            elif target is not None and id(domain) in grouped_domains:
                columns.append([pool.top if row < target else pool.draw(rng, avoid=pool.top) for row in range(rows)])
            else:
                columns.append([pool.draw(rng) for _ in range(rows)])
        data = tuple(tuple(columns[i][row].stored(aff) for i, aff in enumerate(table.affinities))
                     for row in range(rows))
        filled.append((table, data))
    return tuple(filled)


LiteralUse = tuple[ColumnKey, Literal]  # a column and a value a query compares it with


def query_literals(query: str, context: str) -> frozenset[LiteralUse]:
    """The (column, literal) comparisons of any query (e.g. a prediction) over the context's tables."""
    tables = context_schema(context)
    if not tables:
        return frozenset()
    return frozenset((key, lit) for key, lits in gold_facts(query, tables).literals.items() for lit in lits)


@lru_cache(maxsize=2048)
def fills_for(context: str, gold: str, extra: frozenset[LiteralUse] = frozenset(),
              count: int = N_DATABASES) -> tuple[Fill, ...] | None:
    """``count`` deterministic fills for one row, or None when the context builds no table.

    ``extra``: literals of the prediction being scored (:func:`query_literals`): they and their neighbours join
    the pools (as ordinary values, not made frequent like the gold's). A wrong threshold the gold never mentions
    (``age > 1`` for a gold without one) is only exposed by data that crosses it; a prediction that means the
    same as the gold agrees with it on any data, so extra values cannot make a right answer wrong.
    """
    tables = context_schema(context)
    if not tables:
        return None
    probes: dict[ColumnKey, set[Literal]] = {}
    for key, literal in extra:
        probes.setdefault(key, set()).add(literal)
    facts = dataclasses.replace(gold_facts(gold, tables), probes=probes)
    return tuple(make_fill(tables, facts, random.Random(fill_seed(context, gold, i))) for i in range(count))


def fill_database(fill: Fill) -> sqlite3.Connection:
    """An in-memory database: the context's tables (as :meth:`Table.create_sql`) with the fill's rows; the caller
    sandboxes the model's query."""
    conn = sqlite3.connect(":memory:")
    for table, data in fill:
        conn.execute(table.create_sql())
        if data and table.columns:
            marks = ", ".join("?" for _ in table.columns)
            conn.executemany(f"INSERT INTO {quote_identifier(table.name)} VALUES ({marks})", data)
    return conn



