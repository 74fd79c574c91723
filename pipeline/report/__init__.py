"""``pipe report``: one self-contained HTML page about a head on a split of a feature file.

:func:`write_report` (in :mod:`.page`) computes everything once and writes the page; the
sections are :mod:`.sections`, the charts :mod:`.svg`, the thumbnails :mod:`.thumbnails`, and
the checks of the data itself (label issues, duplicates across splits) :mod:`.data_issues`.
"""

from pipeline.report.page import ReportResult, write_report

__all__ = ["ReportResult", "write_report"]
