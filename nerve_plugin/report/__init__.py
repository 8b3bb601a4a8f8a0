"""``nerve-report``: one self-contained HTML page from a run's NerVE JSONL (and its TensorBoard loss).

    nerve-report <dump_folder>/nerve/metrics.jsonl --tensorboard <dump_folder>/tb -o report.html

data.py reads the records, svg.py draws the figures, page.py lays out the page, cli.py is the command. The
metrics' names, titles and labels are nerve_plugin.records' registry; no torchtitan is imported (tensorboard only
to read a loss curve).
"""

from .cli import build_report, main
from .data import RunData, load_loss, load_run
from .page import ReportError

__all__ = ["ReportError", "RunData", "build_report", "load_loss", "load_run", "main"]
