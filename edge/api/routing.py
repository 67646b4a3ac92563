"""How a tablet API route is declared, checked, run and described.

A route is an async function of a ``Ctx`` (and of its decoded body, when it takes one),
declared with ``ApiRoutes.route``: its method and path, the msgspec types of its body, query
and response, who may call it (``Auth`` and a ``Permission``) and the error codes it can
answer. From that one declaration:

* the request is checked before the function runs: the device credential
  (``X-Fynlo-Device``), the employee session (``Authorization: Bearer``) bound to that
  device, the permission (or a manager's one-time approval, ``X-Fynlo-Approval``), then the
  JSON body and the query, decoded into their types (a mismatch is ``422 invalid_request``
  naming the field);
* the response is encoded from its type once, with the declared status;
* the OpenAPI document (``openapi.build``) lists it, so the document cannot drift from the
  routes; a test checks both ways and validates responses against it.

A mutating route does its work in ``ctx.mutate(fn)``: ``fn`` runs in one store transaction
(``edge.tx``), which also records an audit entry (who, which device, the operation, each
changed row before and after; ``edge.audit``) and, when the request carries an
``Idempotency-Key``, the encoded answer under that key. A retry with the same key gets
that first answer back and nothing runs twice; the same key with a different request is
``422 idempotency_key_reused``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from shared.roles import APPROVABLE, Permission

from ..store import EdgeStore
from ..tx import Tx
from . import audit
from .auth import AUTHENTICATOR, Principal
from .errors import ApiCode, ApiError
from .idempotency import ANSWERED

T = TypeVar("T")

STORE = web.AppKey("api_store", EdgeStore)
MAX_BODY = 256 * 1024  # bytes of JSON a tablet may send
IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9._:-]{8,128}")


class Auth(Enum):
    """Who may call a route."""

    PUBLIC = "public"  # anyone on the LAN (the OpenAPI document, pairing)
    DEVICE = "device"  # a paired device (employee login, kitchen screens)
    EMPLOYEE = "employee"  # a paired device with a logged-in employee


@dataclass(frozen=True, slots=True)
class Operation:
    """One declared route: everything the checks, the runner and the document need."""

    method: str
    path: str
    op_id: str
    summary: str
    fn: Callable[..., Awaitable[Any]]
    body: type | None
    query: type | None
    response: type | None
    status: int
    auth: Auth
    permission: Permission | None
    errors: tuple[ApiCode, ...]
    tags: tuple[str, ...]
    #: False for a route whose answer holds a credential: the edge never stores it, so
    #: such a route takes no Idempotency-Key (a retry runs again)
    idempotent: bool = True

    @property
    def mutating(self) -> bool:
        """Whether the route changes anything (it is audited and takes Idempotency-Key)."""
        return self.method in ("POST", "PUT", "PATCH", "DELETE")


class Replayed(Exception):
    """Raised inside a transaction that finds its Idempotency-Key already answered."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__("replayed")
        self.status = status
        self.body = body


@dataclass(slots=True)
class Ctx:
    """One request as a route sees it."""

    request: web.Request
    op: Operation
    principal: Principal | None
    query: Any = None
    approval: tuple[str, str] | None = None  # (approval id, manager) lent for this action
    _idempotency: tuple[str, str] | None = None  # (key, request fingerprint)
    _answer: bytes | None = field(default=None)

    @property
    def store(self) -> EdgeStore:
        """The edge store."""
        return self.request.app[STORE]

    @property
    def params(self) -> dict[str, str]:
        """The path's parameters."""
        return dict(self.request.match_info)

    @property
    def employee_id(self) -> str | None:
        """The logged-in employee, if any."""
        return self.principal.employee_id if self.principal else None

    @property
    def device_id(self) -> str | None:
        """The calling device, if paired."""
        return self.principal.device_id if self.principal else None

    @property
    def approved_by(self) -> str | None:
        """The manager whose approval this action uses, if it needs one."""
        return self.approval[1] if self.approval and self._approval_used else None

    _approval_used: bool = False

    def require(self, permission: Permission) -> None:
        """Refuse unless the employee has ``permission`` or a manager approved this action.

        An approval is spent (once) by the transaction of ``mutate``, and only when needed.
        """
        if self.principal is not None and permission in self.principal.permissions:
            return
        if permission in APPROVABLE and self.approval is not None:
            self._approval_used = True
            return
        if permission in APPROVABLE:
            raise ApiError(ApiCode.APPROVAL_REQUIRED, permission=str(permission))
        raise ApiError(ApiCode.PERMISSION_DENIED, permission=str(permission))

    async def mutate(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn`` in one transaction with its audit entry (and idempotency record)."""
        op, principal = self.op, self.principal
        idem = self._idempotency
        encoder = msgspec.json.Encoder()

        device = principal.device_id if principal else ""

        def body(tx: Tx) -> T:
            if idem is not None:  # first: a retry racing its original is answered, not refused
                found = tx.one(
                    "SELECT fingerprint, status, body FROM idempotency"
                    " WHERE device_id = ? AND key = ?",
                    (device, idem[0]),
                )
                if found is not None:
                    if found[0] != idem[1]:
                        raise ApiError(ApiCode.IDEMPOTENCY_KEY_REUSED, key=idem[0])
                    raise Replayed(found[1], found[2])
            if self._approval_used and self.approval is not None:
                spent = tx.execute(
                    "UPDATE approvals SET used_at_ms = ? WHERE id = ? AND used_at_ms IS NULL",
                    (tx.now_ms, self.approval[0]),
                )
                if spent != 1:
                    raise ApiError(ApiCode.APPROVAL_INVALID, "the approval was already used")
            result = fn(tx)
            audit.record(tx, op.op_id, principal, self.approved_by)
            if idem is not None:
                answer = encoder.encode(result)
                tx.execute(
                    "INSERT INTO idempotency (device_id, key, fingerprint, status, body, at_ms)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        device,
                        idem[0],
                        idem[1],
                        op.status,
                        answer,
                        tx.now_ms,
                    ),
                )
                self._answer = answer
            return result

        result = await self.store.transaction(body)
        if idem is not None:
            self.request.app[ANSWERED].add(device, idem[0])
        return result


Route = Callable[..., Awaitable[Any]]


class ApiRoutes:
    """The declared routes of one resource module."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.operations: list[Operation] = []

    def route(
        self,
        method: str,
        path: str,
        *,
        summary: str,
        body: type | None = None,
        query: type | None = None,
        response: type | None = None,
        status: int = 200,
        auth: Auth = Auth.EMPLOYEE,
        permission: Permission | None = None,
        errors: tuple[ApiCode, ...] = (),
        idempotent: bool = True,
    ) -> Callable[[Route], Route]:
        """Declare ``fn`` as the route ``method path``."""

        def register(fn: Route) -> Route:
            self.operations.append(
                Operation(
                    method.upper(),
                    path,
                    fn.__name__,
                    summary,
                    fn,
                    body,
                    query,
                    response,
                    status,
                    auth,
                    permission,
                    errors,
                    (self.tag,),
                    idempotent,
                )
            )
            return fn

        return register


def add_routes(app: web.Application, groups: list[ApiRoutes]) -> list[Operation]:
    """Add every group's routes to ``app``; returns the operations (for the document)."""
    ops = [op for group in groups for op in group.operations]
    for op in ops:
        app.router.add_route(op.method, op.path, _handler(op), name=op.op_id)
    return ops


def _handler(op: Operation) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    encoder = msgspec.json.Encoder()
    body_decoder: msgspec.json.Decoder[Any] | None = (
        msgspec.json.Decoder(op.body) if op.body is not None else None
    )

    async def handle(request: web.Request) -> web.StreamResponse:
        principal = await _authenticate(request, op)
        ctx = Ctx(request, op, principal)
        raw = b""
        if body_decoder is not None:
            raw = await _read_body(request)
        if op.mutating and op.idempotent:
            ctx._idempotency = _idempotency(request, raw)
            if ctx._idempotency is not None:
                # A retry is answered before anything else is checked again: the approval
                # it carried is spent by now, and the first answer is the answer.
                replay = await _answered(ctx, ctx._idempotency)
                if replay is not None:
                    return replay
        if principal is not None and principal.employee_id is not None:
            ctx.approval = await _approval(request, principal)
        if op.permission is not None:
            ctx.require(op.permission)
        if op.query is not None:
            ctx.query = _decode_query(request, op.query)
        args: list[Any] = [ctx]
        if body_decoder is not None:
            try:
                args.append(body_decoder.decode(raw))
            except msgspec.ValidationError as exc:
                raise ApiError(ApiCode.INVALID_REQUEST, str(exc)) from None
            except msgspec.DecodeError as exc:
                raise ApiError(ApiCode.MALFORMED_JSON, str(exc)) from None
        try:
            result = await op.fn(*args)
        except Replayed as replay:
            return _json(replay.body, replay.status, replayed=True)
        if ctx._answer is not None:
            return _json(ctx._answer, op.status)
        if op.response is None:
            return web.Response(status=op.status)
        return _json(encoder.encode(result), op.status)

    handle.__name__ = op.op_id
    return handle


async def _answered(ctx: Ctx, idem: tuple[str, str]) -> web.Response | None:
    """The stored first answer to this Idempotency-Key, if the request was already done."""
    device = ctx.principal.device_id if ctx.principal else ""
    if not ctx.request.app[ANSWERED].may_have(device, idem[0]):
        return None  # a new key: no read needed (see ``idempotency``)
    rows = await ctx.store.query(
        "SELECT fingerprint, status, body FROM idempotency WHERE device_id = ? AND key = ?",
        (device, idem[0]),
    )
    if not rows:
        return None
    fingerprint, status, body = rows[0]
    if fingerprint != idem[1]:
        raise ApiError(ApiCode.IDEMPOTENCY_KEY_REUSED, key=idem[0])
    return _json(body, status, replayed=True)


def _json(body: bytes, status: int, replayed: bool = False) -> web.Response:
    headers = {"Idempotent-Replayed": "true"} if replayed else None
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


async def _read_body(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise ApiError(ApiCode.BODY_TOO_LARGE, limit=MAX_BODY)
    if request.body_exists and request.content_type not in ("application/json", ""):
        raise ApiError(ApiCode.UNSUPPORTED_MEDIA_TYPE, content_type=request.content_type)
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise ApiError(ApiCode.BODY_TOO_LARGE, limit=MAX_BODY)
    return raw or b"{}"


def _decode_query(request: web.Request, kind: type) -> Any:
    try:
        return msgspec.convert(dict(request.query), kind, strict=False)
    except msgspec.ValidationError as exc:
        raise ApiError(ApiCode.INVALID_REQUEST, f"query: {exc}") from None


def _idempotency(request: web.Request, raw: bytes) -> tuple[str, str] | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not IDEMPOTENCY_KEY.fullmatch(key):
        raise ApiError(
            ApiCode.INVALID_REQUEST, "Idempotency-Key must be 8-128 letters, digits or ._:-"
        )
    fingerprint = hashlib.sha256(
        b"\0".join([request.method.encode(), request.path.encode(), raw])
    ).hexdigest()
    return key, fingerprint


async def _authenticate(request: web.Request, op: Operation) -> Principal | None:
    if op.auth is Auth.PUBLIC:
        return None
    auth = request.app[AUTHENTICATOR]
    device = await auth.device(request.headers.get("X-Fynlo-Device", ""))
    if op.auth is Auth.DEVICE:
        return device
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(ApiCode.NOT_LOGGED_IN, "send the session token as 'Authorization: Bearer'")
    return await auth.session(token.strip(), device)


async def _approval(request: web.Request, principal: Principal) -> tuple[str, str] | None:
    token = request.headers.get("X-Fynlo-Approval")
    if not token:
        return None
    return await request.app[AUTHENTICATOR].approval(token, principal)
