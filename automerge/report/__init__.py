"""Reports: ``report.html`` drawn from ``ReportData`` (a leaf: it imports nothing from the rest of
automerge; the study gathers the data)."""

from automerge.report.html import (
    GridCell,
    GuardData,
    Margin,
    ParetoData,
    ParetoPoint,
    ReportData,
    recovery_line,
    render_report,
)

__all__ = [
    "GridCell",
    "GuardData",
    "Margin",
    "ParetoData",
    "ParetoPoint",
    "ReportData",
    "recovery_line",
    "render_report",
]
