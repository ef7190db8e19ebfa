"""A pytest plugin: values a test measured, listed at the end of every run.

A test calls record_property(MEASURED, "...") (e.g. the CUDA-vs-torch logits comparisons'
max relative errors); the terminal summary shows each under "measured", so they reach the
output of a plain `pytest -m gpu` run, not only under -s.
"""

from __future__ import annotations

MEASURED = "measured"


def pytest_terminal_summary(terminalreporter) -> None:
    lines = [
        f"{report.nodeid}: {value}"
        for reports in terminalreporter.stats.values()
        for report in reports
        if getattr(report, "when", None) == "call"
        for key, value in getattr(report, "user_properties", ())
        if key == MEASURED
    ]
    if lines:
        terminalreporter.write_sep("-", "measured")
        for line in lines:
            terminalreporter.write_line(line)
