"""Reports: ``report.html`` drawn from ``ReportData`` (a leaf: it imports nothing from the rest of
automerge; the study gathers the data)."""

from automerge.report.html import ReportData, render_report

__all__ = ["ReportData", "render_report"]
