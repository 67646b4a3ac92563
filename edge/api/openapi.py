"""The OpenAPI 3.1 document of the tablet API, built from the declared routes themselves.

Every ``Operation`` contributes its path, method, summary, parameters, request body,
response schema (from its msgspec types, via ``msgspec.json.schema_components``), the
credentials it needs, and its error responses; every error body has the same ``Error``
schema, whose ``code`` is one of the stable codes. Nothing is written by hand, so the
document lists exactly the routes the app serves (a test checks both directions). The one
exception: a route that is not JSON (the live WebSocket, the kitchen display's page) is still
an ``Operation``, and adds what its types cannot say to ``HAND_WRITTEN`` under its id.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from ..errors import EDGE_ERRORS, STORAGE_CODES
from .errors import API_ERRORS, ApiCode
from .routing import Auth, Operation

_PARAM = re.compile(r"\{(\w+)\}")
_REF = "#/components/schemas/{name}"

#: hand-written additions to an operation's entry, by operation id (a ``responses`` entry is
#: merged into the generated ones): for routes that are not JSON, e.g. a WebSocket
HAND_WRITTEN: dict[str, dict[str, Any]] = {}


class ErrorDetail(msgspec.Struct, frozen=True):
    """What went wrong: a stable code, a message, and details."""

    code: str
    message: str
    details: dict[str, Any] | None = None


class Error(msgspec.Struct, frozen=True):
    """Every error response."""

    error: ErrorDetail


#: errors any route can answer, by what it requires
_COMMON: dict[Auth, tuple[ApiCode, ...]] = {
    Auth.PUBLIC: (),
    Auth.DEVICE: (ApiCode.DEVICE_NOT_PAIRED,),
    Auth.EMPLOYEE: (
        ApiCode.DEVICE_NOT_PAIRED,
        ApiCode.NOT_LOGGED_IN,
        ApiCode.TOKEN_EXPIRED,
        ApiCode.WRONG_DEVICE,
    ),
}


def build(
    ops: list[Operation], title: str = "Fynlo edge API", version: str = "1"
) -> dict[str, Any]:
    """The OpenAPI document for ``ops``."""
    types: list[Any] = [Error]
    for op in ops:
        types += [t for t in (op.body, op.response) if t is not None]
    schemas, components = msgspec.json.schema_components(types, ref_template=_REF)
    schema_of = dict(zip([id(t) for t in types], schemas, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for op in ops:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, schema_of)
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "device": {"type": "apiKey", "in": "header", "name": "X-Fynlo-Device"},
                "employee": {"type": "http", "scheme": "bearer"},
            },
        },
    }


def _operation(op: Operation, schema_of: dict[int, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"operationId": op.op_id, "summary": op.summary, "tags": list(op.tags)}
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _PARAM.findall(op.path)
    ]
    if op.query is not None:
        for name, field in _query_fields(op.query):
            params.append({"name": name, "in": "query", "required": False, "schema": field})
    if op.mutating and op.idempotent:
        params.append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "a retry with the same key gets the first answer back",
                "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{8,128}$"},
            }
        )
    if params:
        out["parameters"] = params
    if op.body is not None:
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schema_of[id(op.body)]}},
        }
    ok: dict[str, Any] = {"description": "OK"}
    if op.response is not None:
        ok["content"] = {"application/json": {"schema": schema_of[id(op.response)]}}
    responses: dict[str, Any] = {str(op.status): ok}
    codes = list(_COMMON[op.auth]) + list(op.errors)
    if op.body is not None or op.query is not None:
        codes += [ApiCode.INVALID_REQUEST, ApiCode.MALFORMED_JSON, ApiCode.BODY_TOO_LARGE]
    if op.permission is not None:
        codes.append(ApiCode.PERMISSION_DENIED)
    if op.mutating and op.idempotent:
        codes.append(ApiCode.IDEMPOTENCY_KEY_REUSED)
    by_status: dict[int, list[str]] = {}
    for code in dict.fromkeys(codes):
        by_status.setdefault(API_ERRORS[code].status, []).append(str(code))
    if op.mutating:  # a write the database cannot take (full disk, a lock held elsewhere)
        for storage in STORAGE_CODES:
            by_status.setdefault(EDGE_ERRORS[storage].status, []).append(str(storage))
    for status, names in sorted(by_status.items()):
        responses[str(status)] = {
            "description": "error: " + ", ".join(names),
            "content": {"application/json": {"schema": {"$ref": _REF.format(name="Error")}}},
        }
    out["responses"] = responses
    if op.auth is Auth.DEVICE:
        out["security"] = [{"device": []}]
    elif op.auth is Auth.EMPLOYEE:
        out["security"] = [{"device": [], "employee": []}]
    else:
        out["security"] = []
    extra = HAND_WRITTEN.get(op.op_id, {})
    out.update({**extra, "responses": {**responses, **extra.get("responses", {})}})
    return out


def _query_fields(kind: type) -> list[tuple[str, dict[str, Any]]]:
    (schema,), components = msgspec.json.schema_components([kind], ref_template=_REF)
    target = components.get(kind.__name__, schema)
    props = target.get("properties", {})
    return [(name, props[name]) for name in props]
