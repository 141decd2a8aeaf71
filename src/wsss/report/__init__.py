"""Human-readable reports of a run directory (``wsss report runs/<name>``)."""

from wsss.report.html import render_report, write_report

__all__ = ["render_report", "write_report"]
