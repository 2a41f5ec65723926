"""SQL over the lake (DuckDB): read-only, sandboxed, time- and size-limited."""

from .sql import QueryResult, list_tables, query_arrow, run_query

__all__ = ["QueryResult", "list_tables", "query_arrow", "run_query"]
