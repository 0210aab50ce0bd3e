"""``gradcheck report``: the paper's Table 1, its findings and figures from run folders.

``tables`` and ``figures`` are pure (DataFrame in, DataFrame or Figure out); ``render`` reads the
inputs and is the only writer; ``paper`` holds the published numbers the report compares with.
"""

from gradcheck.report.render import (
    build_report,
    find_inputs,
    load_runs,
    render_report,
    write_records,
)

__all__ = ["build_report", "find_inputs", "load_runs", "render_report", "write_records"]
