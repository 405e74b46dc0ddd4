"""eval.sql_databases: what the synthesised databases hold (the gold's literals, neighbours, duplicates, shared join
values, SQLite's own typing), that they are deterministic, and how the gold query is read."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections import Counter

import pytest

from eval.sql_databases import (
    N_DATABASES,
    ROWS_PER_TABLE,
    Literal,
    context_schema,
    double_quoted_strings,
    fill_database,
    fills_for,
    gold_facts,
    is_key_column,
    number_cell,
    parse_one,
    query_literals,
    type_affinity,
)

HEAD = "CREATE TABLE head (name VARCHAR, born_state VARCHAR, age INTEGER, budget REAL)"


def column_values(context: str, gold: str, table: str, column: str) -> list[list[object]]:
    """The column's values in each fill."""
    out = []
    for fill in fills_for(context, gold) or ():
        conn = fill_database(fill)
        out.append([r[0] for r in conn.execute(f'SELECT "{column}" FROM "{table}"')])
        conn.close()
    return out


@pytest.mark.parametrize(
    ("declared", "affinity"),
    [("INTEGER", "INTEGER"), ("BIGINT", "INTEGER"), ("VARCHAR(20)", "TEXT"), ("TEXT", "TEXT"), ("", "BLOB"),
     ("REAL", "REAL"), ("DOUBLE", "REAL"), ("NUMBER", "NUMERIC"), ("DATE", "NUMERIC")],
)
def test_type_affinity_follows_sqlite(declared: str, affinity: str) -> None:
    assert type_affinity(declared) == affinity


def test_schema_is_read_by_sqlite_and_bad_contexts_give_none() -> None:
    tables = context_schema(HEAD + "; CREATE TABLE t2 (x)")
    assert tables is not None
    assert [t.name for t in tables] == ["head", "t2"]
    assert tables[0].columns == ("name", "born_state", "age", "budget")
    assert tables[0].affinities == ("TEXT", "TEXT", "INTEGER", "REAL")
    assert context_schema("CREATE TABLE (") is None


def test_fills_are_deterministic_sized_and_null_free() -> None:
    gold = "SELECT name FROM head WHERE born_state = 'Alabama'"
    first = fills_for(HEAD, gold)
    fills_for.cache_clear()
    again = fills_for(HEAD, gold)
    assert first == again  # seeded from the row, not from a global random state
    assert len(first) == N_DATABASES
    for fill in first:
        ((table, rows),) = fill
        assert len(rows) == ROWS_PER_TABLE
        assert all(value is not None for row in rows for value in row)
    assert len({fill for fill in first}) == N_DATABASES  # the fills differ from one another


def test_the_gold_literal_is_frequent_and_its_neighbours_are_present() -> None:
    gold = "SELECT name FROM head WHERE born_state = 'Alabama' AND age > 56"
    states = column_values(HEAD, gold, "head", "born_state")
    ages = column_values(HEAD, gold, "head", "age")
    assert all("Alabama" in values for values in states)  # the WHERE selects something in every fill
    everything = Counter(v for values in states for v in values)
    assert everything["ALABAMA"] + everything["Alabamax"] > 0  # = is case-sensitive, LIKE '%x%' is wider
    all_ages = {v for values in ages for v in values}
    assert {55, 56, 57} <= all_ages  # > vs >=, 56 vs 57
    assert all(isinstance(v, int) for v in all_ages)  # INTEGER column: integers
    assert any(len(values) != len(set(values)) for values in states)  # duplicates: DISTINCT/COUNT matter


def test_varchar_columns_compared_with_numbers_store_text_as_sqlite_compares_it() -> None:
    context = "CREATE TABLE t (episode VARCHAR, viewers VARCHAR, year VARCHAR)"
    gold = "SELECT episode FROM t WHERE viewers = 12.90 AND year > 1907"
    viewers = {v for values in column_values(context, gold, "t", "viewers") for v in values}
    years = {v for values in column_values(context, gold, "t", "year") for v in values}
    assert all(isinstance(v, str) for v in viewers | years)
    assert "12.9" in viewers  # SQLite compares the REAL 12.90 with a TEXT column as '12.9'
    assert {"1906", "1907", "1908"} <= years
    conn = sqlite3.connect(":memory:")
    assert conn.execute("SELECT '12.9' = CAST(12.90 AS TEXT)").fetchone() == (1,)


def test_like_patterns_get_matching_and_nearly_matching_values() -> None:
    context = "CREATE TABLE head (head_id VARCHAR, name VARCHAR)"
    names = {v for values in column_values(context, "SELECT head_id FROM head WHERE name LIKE '%Ha%'", "head", "name")
             for v in values}
    assert "Ha" in names and any("Ha" in v and len(v) > 2 and v != "%Ha%" for v in names)  # matches
    assert names & {"7a", "H7"}  # nearly matches: one character of the pattern changed
    assert "%Ha%" in names  # = vs LIKE


def test_join_columns_share_values() -> None:
    context = ("CREATE TABLE city (City_ID VARCHAR, Population INTEGER); "
               "CREATE TABLE farm_competition (Theme VARCHAR, Host_city_ID VARCHAR)")
    gold = ("SELECT T2.Theme FROM city AS T1 JOIN farm_competition AS T2 ON T1.City_ID = T2.Host_city_ID "
            "WHERE T1.Population > 1000")
    for fill in fills_for(context, gold) or ():
        conn = fill_database(fill)
        assert conn.execute("SELECT COUNT(*) FROM city JOIN farm_competition ON City_ID = Host_city_ID").fetchone()[0]
        conn.close()


def test_having_count_threshold_makes_a_group_of_about_that_size() -> None:
    context = "CREATE TABLE station (city VARCHAR)"
    gold = "SELECT city, COUNT(*) FROM station GROUP BY city HAVING COUNT(*) >= 15"
    sizes = set()
    for fill in fills_for(context, gold) or ():
        conn = fill_database(fill)
        sizes.add(conn.execute("SELECT COUNT(*) FROM station GROUP BY city ORDER BY COUNT(*) DESC").fetchone()[0])
        conn.close()
    assert sizes & {14, 15, 16} and max(sizes) <= 16 + ROWS_PER_TABLE


def test_gold_facts_read_literals_links_and_double_quoted_strings() -> None:
    context = ("CREATE TABLE department (creation VARCHAR, department_id VARCHAR); "
               "CREATE TABLE management (department_id VARCHAR, temporary_acting VARCHAR)")
    gold = ('SELECT T1.creation FROM department AS T1 JOIN management AS T2 ON T1.department_id = T2.department_id '
            'WHERE T2.temporary_acting = "Yes" AND T1.creation BETWEEN 1990 AND 2000')
    facts = gold_facts(gold, context_schema(context))
    assert facts.literals[("management", "temporary_acting")] == {Literal("Yes", True)}
    assert facts.literals[("department", "creation")] == {Literal("1990", False), Literal("2000", False)}
    assert (("department", "department_id"), ("management", "department_id")) in facts.links
    assert query_literals("SELECT creation FROM department WHERE creation = 'x'", context) == frozenset(
        {(("department", "creation"), Literal("x", True))})
    assert query_literals("not sql", context) == frozenset()


def test_double_quoted_names_are_strings_unless_they_name_a_column() -> None:
    text = 'SELECT "name" FROM head WHERE born_state = "Texas" ORDER BY "total"'
    tree = double_quoted_strings(parse_one(text), text, frozenset({"name", "born_state"}))
    sql = tree.sql(dialect="sqlite")
    assert "'Texas'" in sql and '"name"' in sql and "'total'" in sql
    aliased = 'SELECT COUNT(*) AS "total" FROM head ORDER BY "total"'
    assert "'total'" not in double_quoted_strings(parse_one(aliased), aliased, frozenset()).sql(dialect="sqlite")


@pytest.mark.parametrize(("literal", "text", "number"), [("56", "56", 56), ("12.90", "12.9", 12.9),
                                                         ("1e3", "1000.0", 1000.0), ("-5", "-5", -5)])
def test_number_cell_is_sqlite_reading_of_a_literal(literal: str, text: str, number: float) -> None:
    cell = number_cell(literal)
    assert cell is not None and (cell.text, cell.number) == (text, number)
    assert number_cell("abc") is None and number_cell("1; DROP TABLE x") is None


@pytest.mark.parametrize(
    ("table", "column", "key"),
    [("station", "id", True), ("students", "student_id", True), ("courses", "course_id", True),
     ("city", "City_ID", True), ("addresses", "address_id", True), ("farm_competition", "Competition_ID", True),
     ("status", "station_id", False), ("management", "department_id", False),
     ("farm_competition", "Host_city_ID", False), ("t", "paid", False), ("head", "age", False)],
)
def test_key_columns_by_name(table: str, column: str, key: bool) -> None:
    assert is_key_column(table, column) is key


def test_keys_and_ordered_columns_hold_each_value_once() -> None:
    context = "CREATE TABLE students (student_id VARCHAR, registration_date VARCHAR, city VARCHAR)"
    gold = "SELECT student_id FROM students WHERE city = 'Rome' ORDER BY registration_date DESC LIMIT 1"
    for column in ("student_id", "registration_date"):
        for values in column_values(context, gold, "students", column):
            assert len(values) == len(set(values)) == ROWS_PER_TABLE
    assert any(len(set(v)) < len(v) for v in column_values(context, gold, "students", "city"))


def test_fills_do_not_depend_on_the_process_hash_seed() -> None:
    """Every model must be scored on the same databases, also when they are scored in different processes."""
    program = (
        "import hashlib; from eval.sql_databases import fills_for, query_literals\n"
        "c = 'CREATE TABLE department (creation VARCHAR, department_id VARCHAR); "
        "CREATE TABLE management (department_id VARCHAR, head_id VARCHAR, temporary_acting VARCHAR)'\n"
        "g = \"SELECT DISTINCT T1.creation FROM department AS T1 JOIN management AS T2 ON "
        "T1.department_id = T2.department_id WHERE T2.temporary_acting = 'Yes' AND T1.creation > 1990\"\n"
        "print(hashlib.sha256(repr(fills_for(c, g, query_literals(g, c))).encode()).hexdigest())\n")
    digests = {subprocess.run([sys.executable, "-c", program], check=True, capture_output=True, text=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(digests) == 1
