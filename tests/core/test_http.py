"""One status per error type, for the API and the serving process alike."""

import pytest

from iot2ml.core import errors
from iot2ml.core.http import bearer, error_detail, http_status


@pytest.mark.parametrize(("err", "status"), [
    (errors.AuthError("who?"), 401),
    (errors.Forbidden("not yours"), 403),
    (PermissionError("not yours"), 403),
    (errors.NotFound("none"), 404),
    (errors.AlreadyExists("twice"), 409),
    (errors.PayloadTooLarge("big"), 413),
    (errors.InvalidInput("field x"), 422),
    (errors.Malformed("not JSON"), 400),
    (errors.QueryError("DROP"), 400),
    (errors.ConfigError("key"), 400),
    (errors.ModelFailed("raised"), 503),
    (errors.BrokerUnavailable("down"), 503),
    (errors.LakeUnavailable("down"), 503),
    (errors.NotConfirmed("slow"), 504),
])
def test_each_error_has_one_status(err, status):
    assert http_status(err) == status


def test_a_message_refused_with_several_reasons_lists_them():
    assert error_detail(errors.Malformed("nothing was stored", ["a", "b"])) == {
        "error": "nothing was stored", "reasons": ["a", "b"]}
    assert error_detail(errors.InvalidInput("field x")) == "field x"


def test_bearer():
    assert bearer("Bearer abc ") == "abc" and bearer("bearer abc") == "abc"
    assert bearer("Basic abc") is None and bearer(None) is None and bearer("Bearer  ") is None


def test_unknown_query_parameters_are_refused_with_the_ones_the_route_takes():
    from typing import Annotated

    from fastapi import Depends, FastAPI, Query
    from fastapi.testclient import TestClient

    from iot2ml.core.http import install_error_handlers, known_query_only

    def paging(offset: int = 0) -> int:
        return offset

    app = FastAPI(dependencies=[Depends(known_query_only)])
    install_error_handlers(app)

    @app.get("/items")
    async def items(start: Annotated[int, Depends(paging)], limit: Annotated[int, Query()] = 10) -> dict:
        return {"start": start, "limit": limit}

    client = TestClient(app)
    assert client.get("/items?limit=5&offset=2").json() == {"start": 2, "limit": 5}  # a dependency's too
    refused = client.get("/items?limt=5")
    assert refused.status_code == 422
    assert refused.json()["detail"] == "unknown query parameter 'limt': this route takes limit, offset"
    twice = client.get("/items?limit=5&limit=6")
    assert twice.status_code == 422 and twice.json()["detail"] == "query parameter 'limit' is given 2 times: give it once"
