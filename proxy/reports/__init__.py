"""Emission reports from the ledger's aggregates.

- ``build``: the report and the admin summary as dicts (totals, groups, equivalents); pure;
- ``tables``: a report as CSV and as the terminal table; pure;
- ``html_page``: a report as one self-contained HTML page; pure;
- ``api``: the HTTP endpoints (one request's record, a user's report, the admin summary), with
  their access rules. Imported by the app only, so the pure modules load without aiohttp.
"""

from proxy.reports.build import (
    EQUIVALENTS_SOURCE,
    GROUP_BY,
    Totals,
    build_report,
    build_summary,
    default_period,
    equivalents,
    group,
    parse_day,
)
from proxy.reports.html_page import render_html
from proxy.reports.tables import report_csv, report_table

__all__ = [
    "EQUIVALENTS_SOURCE",
    "GROUP_BY",
    "Totals",
    "build_report",
    "build_summary",
    "default_period",
    "equivalents",
    "group",
    "parse_day",
    "render_html",
    "report_csv",
    "report_table",
]
