"""SQL over HTTP: ``POST /api/v1/query`` (one read-only SELECT) and ``GET /api/v1/tables``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Annotated, Any

import orjson
from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import BaseModel, Field

from ..core.http import Principal, needs, needs_permission
from .sql import list_tables, run_query


class QueryRequest(BaseModel):
    sql: str = Field(..., description="One read-only SELECT over the lake tables.", examples=["SELECT count(*) FROM raw"])


class QueryResponse(BaseModel):
    columns: list[str]
    types: list[str] = Field(default_factory=list, description="Arrow type of each column, e.g. "
                             "timestamp[us, tz=UTC] (sent as RFC 3339 text), double, string.")
    rows: list[list[Any]]
    truncated: bool = False


@dataclass
class QueryHTTP:
    """What the SQL routes need: the lake and the limits of a query (settings ``query_*``)."""

    lake: Any
    timeout: float
    max_rows: int
    hidden_for: Callable[[Principal], Collection[str]] = lambda _who: ()
    """Tables a caller may not see (the composition root: ``audit`` without ``audit:read``)."""


router = APIRouter(tags=["query"])
DataRead = Annotated[Principal, needs_permission("data:read")]
Deps = Annotated[QueryHTTP, needs(QueryHTTP)]


@router.post("/api/v1/query", response_model=QueryResponse, summary="Run one read-only SQL query",
             responses={400: {"description": "SQL that cannot run or is not allowed: the reason says why"}})
async def post_query(req: QueryRequest, who: DataRead, deps: Deps) -> Response:
    result = await asyncio.to_thread(run_query, deps.lake, req.sql, timeout=deps.timeout, max_rows=deps.max_rows,
                                     hidden=deps.hidden_for(who))
    return Response(orjson.dumps(result.to_dict(), default=str, option=orjson.OPT_SERIALIZE_NUMPY),
                    media_type="application/json")


@router.get("/api/v1/tables", summary="Tables in the lake with their columns")
async def get_tables(who: DataRead, deps: Deps) -> list[dict[str, Any]]:
    return await asyncio.to_thread(list_tables, deps.lake, hidden=deps.hidden_for(who))
