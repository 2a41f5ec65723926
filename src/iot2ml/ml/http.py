"""The ML workbench over HTTP: train and register a model, list the registered ones, add labels."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from ..core.http import Principal, needs, needs_permission

if TYPE_CHECKING:
    from .workbench import Workbench


class TrainRequest(BaseModel):
    task: str = Field(..., description="forecast, classify, regress or anomaly", examples=["classify"])
    table: str
    name: str
    options: dict[str, Any] = Field(default_factory=dict, description="Task options, e.g. {\"label\": \"quality\"}")
    where: str | None = None


class LabelsRequest(BaseModel):
    rows: list[dict[str, Any]]
    entity_column: str = "entity"
    label_column: str = "label"
    table: str | None = Field(None, description="Check that every entity exists in this table.")
    source: str = "api"


@dataclass
class MLHTTP:
    """What the ML routes need: the workbench, built on first use (MLflow takes a while to import)."""

    workbench: Callable[[], Workbench]


router = APIRouter(tags=["models"])
Deps = Annotated[MLHTTP, needs(MLHTTP)]
MLWrite = Annotated[Principal, needs_permission("ml:write")]
"""Train and import labels: data scientists, operators and admins."""
ModelsRead = Annotated[Principal, needs_permission("models:read")]
"""Registered models: every role."""


@router.post("/api/v1/train", status_code=201, summary="Train and register a model (runs to completion)",
             responses={404: {"description": "No such table or column"},
                        422: {"description": "Options or data the task cannot train on: the reason says why"}})
async def post_train(req: TrainRequest, _who: MLWrite, deps: Deps) -> dict[str, Any]:
    from .jobs import TrainJob

    job = TrainJob(task=req.task, table=req.table, name=req.name, options=req.options, where=req.where)
    return await asyncio.to_thread(lambda: deps.workbench().train(job))


@router.get("/api/v1/models", summary="Registered models: versions, aliases, metrics vs baseline")
async def get_models(_who: ModelsRead, deps: Deps) -> list[dict[str, Any]]:
    return await asyncio.to_thread(lambda: deps.workbench().models())


@router.post("/api/v1/labels", status_code=201, summary="Add labels (all rows or none)",
             responses={422: {"description": "A row that cannot be a label: every problem is named"}})
async def post_labels(req: LabelsRequest, who: MLWrite, deps: Deps) -> dict[str, int]:
    n = await asyncio.to_thread(lambda: deps.workbench().import_labels(
        req.rows, entity_column=req.entity_column, label_column=req.label_column, table=req.table,
        source=req.source, who=who.name))
    return {"imported": n}
