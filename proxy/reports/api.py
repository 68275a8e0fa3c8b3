"""The emission endpoints: one request's record, a user's report, the admin summary.

Access: the admin token reads everything; a user's own key reads its own records and report.
With neither keys nor an admin token configured (local use), the endpoints are open.
"""

from __future__ import annotations

import hmac
from collections import OrderedDict
from dataclasses import dataclass
from datetime import date

from aiohttp import web

from proxy.accounting import Accountant
from proxy.errors import BadRequest, Forbidden, LedgerError, NotFound, ProxyError, Unauthorized
from proxy.identity import Identity, IdentityResolver, bearer
from proxy.ledger.base import Ledger
from proxy.middleware import json_error
from proxy.records import RequestRecord
from proxy.reports.build import build_report, build_summary, default_period, parse_day
from proxy.reports.tables import report_csv

#: Final records kept in memory so a record can be read before the ledger has it.
RECENT_RECORDS = 10_000


class RecentRecords:
    """A bounded map of the latest final records."""

    def __init__(self, size: int = RECENT_RECORDS) -> None:
        self.size = size
        self._records: OrderedDict[str, RequestRecord] = OrderedDict()

    def add(self, record: RequestRecord) -> None:
        self._records[record.request_id] = record
        if len(self._records) > self.size:
            self._records.popitem(last=False)

    def get(self, request_id: str) -> RequestRecord | None:
        return self._records.get(request_id)


@dataclass(frozen=True, slots=True)
class Caller:
    admin: bool
    identity: Identity | None


class Emissions:
    def __init__(
        self,
        ledger: Ledger,
        accountant: Accountant,
        recent: RecentRecords,
        identity: IdentityResolver,
        admin_token: str | None,
    ) -> None:
        self.ledger = ledger
        self.accountant = accountant
        self.recent = recent
        self.identity = identity
        self.admin_token = admin_token

    @property
    def open_access(self) -> bool:
        return not self.admin_token and not self.identity.keys_required

    def caller(self, request: web.Request) -> Caller:
        if self.open_access:
            return Caller(admin=True, identity=None)
        presented = bearer(request.headers)
        if presented is None:
            raise Unauthorized("missing credentials: send 'Authorization: Bearer <token>'")
        if self.admin_token and hmac.compare_digest(
            presented.encode("utf-8"), self.admin_token.encode("utf-8")
        ):
            return Caller(admin=True, identity=None)
        if self.identity.keys is not None:
            found = self.identity.keys.lookup(presented)
            if found is not None:
                return Caller(admin=False, identity=found)
        raise Unauthorized("invalid credentials")

    async def record(self, request: web.Request) -> web.Response:
        try:
            who = self.caller(request)
            rid = request.match_info["request_id"]
            rec = self.accountant.provisional(rid) or self.recent.get(rid)
            if rec is None:
                rec = await self.ledger.get(rid)
            if rec is None:
                raise NotFound(f"no record for request {rid!r}")
            if not who.admin and (who.identity is None or who.identity.user != rec.user):
                raise Forbidden("a key reads only its own user's records")
            return web.json_response(rec.to_dict())
        except LedgerError as e:
            return json_error(ProxyError(f"ledger unavailable: {e}"))
        except ProxyError as err:
            return json_error(err)

    async def user_report(self, request: web.Request) -> web.Response:
        try:
            who = self.caller(request)
            user = request.match_info["user"]
            if not who.admin and (who.identity is None or who.identity.user != user):
                raise Forbidden("a key reads only its own user's report")
            start, end, group_by = self._period(request)
            rows = await self.ledger.aggregates(start.isoformat(), end.isoformat(), user=user)
            try:
                report = build_report(user, start, end, rows, group_by)
            except ValueError as e:
                raise BadRequest(str(e)) from None
            if "text/csv" in request.headers.get("Accept", ""):
                return web.Response(text=report_csv(report), content_type="text/csv")
            return web.json_response(report)
        except LedgerError as e:
            return json_error(ProxyError(f"ledger unavailable: {e}"))
        except ProxyError as err:
            return json_error(err)

    async def summary(self, request: web.Request) -> web.Response:
        try:
            who = self.caller(request)
            if not who.admin:
                raise Forbidden("the summary needs the admin token")
            start, end, _ = self._period(request)
            rows = await self.ledger.aggregates(start.isoformat(), end.isoformat())
            return web.json_response(build_summary(start, end, rows))
        except LedgerError as e:
            return json_error(ProxyError(f"ledger unavailable: {e}"))
        except ProxyError as err:
            return json_error(err)

    @staticmethod
    def _period(request: web.Request) -> tuple[date, date, str]:
        start_default, end_default = default_period()
        try:
            start = parse_day(request.query.get("from"), start_default)
            end = parse_day(request.query.get("to"), end_default)
        except ValueError:
            raise BadRequest("'from' and 'to' must be ISO dates, e.g. 2026-11-01") from None
        if end < start:
            raise BadRequest("'to' is before 'from'")
        return start, end, request.query.get("group_by", "day")
