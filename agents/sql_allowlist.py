"""What the SQL guard (agents/sql_guard.py) allows and refuses: its limits, the reasons a
query can be refused (`CODES`), and the tables of sqlglot nodes and function names it checks
a query's tree against.

Functions are an allow-list, not a deny-list: the dangerous ones differ per dialect and
per installed extension and keep growing (PostgreSQL's `query_to_xml`, `ts_stat` and
`table_to_xml` run SQL given as text; `set_config('role', ...)` switches role;
`pg_read_file`, `lo_export`, `dblink*`; SQLite's `load_extension`, `readfile`,
`writefile`, `fts3_tokenizer`), and a deny-list fails open on the one nobody listed. The
allow-list is ordinary scalar, aggregate and window functions; string functions that can
build huge values (`printf`, `format`, `repeat`, `lpad`, `rpad`, `zeroblob`,
`randomblob`) and regular expressions are left out.
"""

from __future__ import annotations

import re

from sqlglot import exp

MAX_SQL_CHARS = 20_000
MAX_TABLE_REFERENCES = 8
INTERNAL_PREFIX = "_pt_"  # names the tool uses for its own CTEs; agents may not use them

# Every reason a query can be refused, with what it means. `SQLRejected.code` is one key.
CODES = {
    "empty": "no SQL was sent",
    "too_long": f"the SQL is longer than {MAX_SQL_CHARS} characters",
    "parse_error": "the SQL does not parse in the warehouse's dialect",
    "multiple_statements": "more than one statement",
    "not_select": "the statement is not a query (SELECT / UNION / INTERSECT / EXCEPT)",
    "forbidden": "a write, DDL, command, SELECT INTO, lock, SET, PRAGMA or ATTACH in the tree",
    "recursive_cte": "a recursive CTE",
    "bind_parameter": "a bind parameter",
    "function": "a function outside the allow-list",
    "table_function": "a table-valued function or UNNEST/LATERAL in FROM",
    "table": "a table that is not allow-listed",
    "qualified_name": "a schema- or database-qualified name, or an unknown qualifier",
    "column": "a column that is not allow-listed",
    "cte_name": "a CTE named like an allowed table or the tool's internal names",
    "cross_join": "a join without ON/USING",
    "too_many_tables": f"more than {MAX_TABLE_REFERENCES} table references",
    "construct": "syntax outside the read-only allow-list",
    "timeout": "the query ran past the time limit (raised by the tool, not by check)",
}

# Statements and clauses that are never allowed anywhere in a query.
FORBIDDEN = (
    exp.DML, exp.DDL, exp.Command, exp.Into, exp.Lock, exp.Set, exp.Pragma, exp.Attach,
    exp.Detach, exp.Drop, exp.Alter, exp.TruncateTable, exp.Transaction, exp.Commit,
    exp.Rollback, exp.Use, exp.Grant, exp.Analyze, exp.Describe, exp.Copy, exp.Merge,
    exp.Insert, exp.Update, exp.Delete, exp.Create,
)
QUERY_ROOTS = (exp.Select, exp.Union, exp.Intersect, exp.Except)

# Non-function nodes a read-only query is made of.
STRUCTURE = (
    exp.Select, exp.Union, exp.Intersect, exp.Except, exp.From, exp.Join, exp.Where,
    exp.Group, exp.Having, exp.Order, exp.Ordered, exp.Limit, exp.Offset, exp.With, exp.CTE,
    exp.Subquery, exp.Table, exp.TableAlias, exp.Alias, exp.Column, exp.Identifier, exp.Star,
    exp.Literal, exp.Boolean, exp.Null, exp.Paren, exp.Tuple, exp.Distinct, exp.Window,
    exp.WindowSpec, exp.DataType, exp.DataTypeParam, exp.Interval, exp.Neg, exp.Not,
    exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.NullSafeEQ, exp.NullSafeNEQ,
    exp.Is, exp.In, exp.Between, exp.Like, exp.ILike, exp.Glob, exp.Escape, exp.Collate,
    exp.Add, exp.Sub, exp.Mul, exp.Div, exp.Mod, exp.DPipe, exp.BitwiseAnd, exp.BitwiseOr,
    exp.BitwiseXor, exp.BitwiseNot, exp.BitwiseLeftShift, exp.BitwiseRightShift,
    exp.And, exp.Or, exp.Exists, exp.Any, exp.All, exp.Case, exp.If, exp.Cast, exp.TryCast,
)
# `Var` is a bare word the generator writes out verbatim: only where it names a unit,
# type or collation (EXTRACT(YEAR FROM ...), INTERVAL '1' DAY, COLLATE NOCASE).
VAR_PARENTS = (
    exp.Extract, exp.Interval, exp.DataType, exp.DataTypeParam, exp.Collate, exp.DateTrunc,
    exp.TimestampTrunc,
)

# Typed sqlglot function nodes that are allowed: the generator writes each as the
# dialect's own ordinary function, so allowing the node allows exactly that function.
FUNCTION_NODES = {
    # aggregates
    exp.Count: "count", exp.Sum: "sum", exp.Avg: "avg", exp.Min: "min", exp.Max: "max",
    exp.GroupConcat: "group_concat / string_agg", exp.Stddev: "stddev",
    exp.StddevPop: "stddev_pop", exp.StddevSamp: "stddev_samp", exp.Variance: "variance",
    exp.VariancePop: "var_pop",
    # strings
    exp.Lower: "lower", exp.Upper: "upper", exp.Length: "length", exp.Substring: "substr",
    exp.Trim: "trim / ltrim / rtrim", exp.Replace: "replace", exp.StrPosition: "instr",
    exp.Concat: "concat", exp.ConcatWs: "concat_ws", exp.Left: "left", exp.Right: "right",
    exp.Initcap: "initcap", exp.Unicode: "unicode", exp.Chr: "char", exp.Hex: "hex",
    exp.SplitPart: "split_part",
    # null handling and types
    exp.Coalesce: "coalesce / ifnull", exp.Nullif: "nullif", exp.Greatest: "greatest",
    exp.Least: "least", exp.Typeof: "typeof",
    # numbers
    exp.Round: "round", exp.Abs: "abs", exp.Floor: "floor", exp.Ceil: "ceil",
    exp.Sign: "sign", exp.Sqrt: "sqrt", exp.Pow: "power", exp.Ln: "ln", exp.Log: "log",
    exp.Exp: "exp",
    # dates
    exp.Date: "date", exp.TimeToStr: "strftime / to_char", exp.StrToTime: "strptime",
    exp.TsOrDsToDate: "date", exp.TsOrDsToTimestamp: "date", exp.Extract: "extract",
    exp.DateTrunc: "date_trunc", exp.TimestampTrunc: "date_trunc", exp.CurrentDate: "current_date",
    exp.CurrentTimestamp: "current_timestamp",
    # window functions
    exp.RowNumber: "row_number", exp.Rank: "rank", exp.DenseRank: "dense_rank",
    exp.Ntile: "ntile", exp.Lag: "lag", exp.Lead: "lead", exp.FirstValue: "first_value",
    exp.LastValue: "last_value", exp.NthValue: "nth_value", exp.PercentRank: "percent_rank",
    exp.CumeDist: "cume_dist",
}
# Functions sqlglot has no node for (it parses them as `Anonymous`), allowed by name.
ANONYMOUS_FUNCTIONS = {
    "total", "ifnull", "julianday", "datetime", "time", "unixepoch", "strftime",
    "date_part", "btrim", "char_length", "character_length", "octet_length",
}
ALLOWED_FUNCTIONS = sorted({*FUNCTION_NODES.values(), *ANONYMOUS_FUNCTIONS})
BIND_PREFIXES = ("$", ":", "@", "?")
# NUL and other C0/C1 controls (tab, newlines, form feed and vertical tab are whitespace)
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")
