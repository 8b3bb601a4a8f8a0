"""The ``nerve-report`` command."""

import argparse
import os
import sys

from .data import load_loss, load_run
from .page import ReportError, choose, render


def find_jsonl(run: str) -> str:
    """A JSONL file, or a dump folder holding nerve/metrics.jsonl."""
    if os.path.isdir(run):
        for candidate in (os.path.join(run, "nerve", "metrics.jsonl"), os.path.join(run, "metrics.jsonl")):
            if os.path.isfile(candidate):
                return candidate
        raise ReportError(f"{run}: no nerve/metrics.jsonl in this folder; expected a JSONL file or a dump folder")
    if not os.path.isfile(run):
        raise ReportError(f"{run}: no such file; expected a JSONL file or a dump folder")
    return run


def build_report(
    run: str,
    output: str | None = None,
    tensorboard: str | None = None,
    layers: list[int] | None = None,
    steps: list[int] | None = None,
    title: str = "",
) -> str:
    """Write the report of ``run`` (a JSONL file or a dump folder) to ``output``; returns its path.

    ``tensorboard``: a folder of TensorBoard runs for the loss curve; by default the dump folder's ``tb`` when
    ``run`` is a dump folder. ``layers``/``steps``: the layers of the line plots and spectra, the steps of the
    spectra (default: a few layers spread over depth; the first, middle and last logged steps).
    """
    jsonl = find_jsonl(run)
    if tensorboard is None and os.path.isdir(run) and os.path.isdir(os.path.join(run, "tb")):
        tensorboard = os.path.join(run, "tb")
    data = load_run(jsonl)
    if not data.steps:
        raise ReportError(f"{jsonl}: no records")
    if tensorboard is not None:
        if not os.path.isdir(tensorboard):
            raise ReportError(f"--tensorboard {tensorboard}: no such folder")
        data.loss = load_loss(tensorboard)
    page = render(data, choose(data, layers, steps), jsonl, tensorboard, title)
    output = output or os.path.join(os.path.dirname(os.path.abspath(jsonl)), "report.html")
    if os.path.isdir(output):
        raise ReportError(
            f"-o {output} is a folder: expected the HTML file to write, e.g. {os.path.join(output, 'report.html')}"
        )
    aside = output + ".tmp"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(aside, "w", encoding="utf-8") as f:
            f.write(page)
        os.replace(aside, output)  # a reader never sees half a page
    except OSError as error:
        # e.g. a folder under a regular file, no permission, a full disk, -o naming a folder
        if os.path.isfile(aside):
            os.remove(aside)
        where = f" ({error.filename})" if error.filename and error.filename != aside else ""
        raise ReportError(f"cannot write the report to {output}: {error.strerror or error}{where}") from None
    return output


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 0,5,11") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nerve-report",
        description="A self-contained HTML report of a NerVE run: heatmaps (layer x step) "
        "of SE, PR, EEE (pre, post, post - pre) and JS, chosen layers over steps, eigen-spectra at chosen steps.",
    )
    parser.add_argument("run", help="the run's JSONL (<dump_folder>/nerve/metrics.jsonl) or its dump folder")
    parser.add_argument("-o", "--output", help="the HTML file to write (default: report.html next to the JSONL)")
    parser.add_argument(
        "--tensorboard",
        metavar="DIR",
        help="TensorBoard folder for the loss curve (default: <dump_folder>/tb when RUN is a dump folder)",
    )
    parser.add_argument(
        "--layers",
        type=_int_list,
        help="layers of the line plots and spectra, e.g. 0,5,11 (default: 4 spread over depth)",
    )
    parser.add_argument(
        "--steps", type=_int_list, help="logged steps of the spectra, e.g. 1,500,1000 (default: first, middle, last)"
    )
    parser.add_argument("--title", default="", help="the page's title (default: NerVE report)")
    args = parser.parse_args(argv)
    try:
        path = build_report(args.run, args.output, args.tensorboard, args.layers, args.steps, args.title)
    except ReportError as error:
        print(f"nerve-report: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
