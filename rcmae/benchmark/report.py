"""The benchmark's report card: ``report.json``, ``report.md``, a self-contained ``report.html`` and figures.

:func:`write_report` takes the plain dict the benchmark assembles (its schema is in the module that builds it;
every path in it is relative to the output folder) and writes it out. The content is laid out once, as a list
of blocks (headings, paragraphs, tables, lists, figures) made of :class:`Span` pieces, and rendered twice: as
GitHub Markdown and as one HTML file with inline CSS and the figures embedded, so the two cannot disagree.

The rules the tables keep: a value links to its log and states its image count (``n=``, linking to the job's
folder); a partial value carries a ``*`` and its note under the table; a cell without a value shows its status
word (``—`` when not planned), never a number; published values carry their source's number. Every file is
written to a temporary name in its folder and renamed over the old one, so a reader never sees half a report.
"""
from __future__ import annotations

import base64
import html
import json
import os
import re
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.parse import quote

import numpy as np

from rcmae.core.plotting import plt, save_figure

__all__ = ["write_report"]

ARROWS = {"higher": "↑", "lower": "↓"}
PARTIAL_MARK = "*"
# kind: (title, x label, its panels as (series key, y label)); the other kinds are bar charts
CURVES = {
    "pretraining": ("Pretraining", "step", (("loss", "loss"), ("knn_top1", "k-NN top-1 (%)"))),
    "finetune": ("Fine-tuning", "epoch", (("train_loss", "train loss"), ("val_top1", "val top-1 (%)"))),
    "linprobe": ("Linear probe", "epoch", (("train_loss", "train loss"), ("val_top1", "val top-1 (%)"))),
}
FIGURE_CAPTIONS = {
    "pretraining": "Pretraining: loss and k-NN top-1 per step",
    "finetune": "ImageNet fine-tuning: train loss and validation top-1 per epoch",
    "linprobe": "Linear probe: train loss and validation top-1 per epoch",
    "robustness": "ImageNet-C: top-1 error per corruption (lower is better)",
    "detection": "COCO detection: AP per object size",
}
OBJECT_SIZES = {"APs": "small", "APm": "medium", "APl": "large"}
FIGURE_STYLE = {"font.size": 9, "axes.titlesize": 10, "legend.fontsize": 8, "figure.dpi": 110}
CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2328; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; }
h1 { font-size: 1.7em; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; margin-top: 1.6em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: .6em 0; }
th, td { border: 1px solid #d0d7de; padding: .35em .7em; vertical-align: top; }
th { background: #eaeef2; text-align: left; }
tbody tr:nth-child(even) { background: #f6f8fa; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num { white-space: nowrap; } th.num { min-width: 5.5em; }  /* the headers wrap, the numbers never */
sub, sup { color: #59636e; }
a { color: #0969da; text-decoration: none; } a:hover { text-decoration: underline; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; white-space: pre-wrap; word-break: break-all; }
code { font-size: .9em; }
figure { margin: 1em 0; } figure img { max-width: 100%; } figcaption { color: #59636e; font-size: .9em; }
"""


# ----------------------------------------------------------------------------- the entry point
def write_report(report: dict, out_dir: str | Path) -> dict[str, str]:
    """Write the figures, ``report.json``, ``report.md`` and ``report.html`` into ``out_dir``.

    Returns the written paths by name: ``json``, ``markdown``, ``html`` and one per figure kind drawn. The
    JSON is ``report`` itself plus ``figure_files`` (the figures' paths, relative to ``out_dir``); a value JSON
    cannot hold (a ``Path``, say) is written as its string rather than losing the report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figure_files = draw_figures(report, out_dir)
    blocks = report_blocks(report, figure_files)
    json_text = json.dumps({**report, "figure_files": figure_files}, indent=2, default=str) + "\n"
    written = {"json": write_text(out_dir / "report.json", json_text),
               "markdown": write_text(out_dir / "report.md", to_markdown(blocks)),
               "html": write_text(out_dir / "report.html", to_html(blocks, report.get("title", "Report"), out_dir))}
    return written | {kind: str(out_dir / path) for kind, path in figure_files.items()}


def write_text(path: Path, text: str) -> str:
    """``text`` into ``path`` (UTF-8) through :func:`atomic_write`; returns the path as a string."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return str(path)


def atomic_write(path: Path, write) -> Path:
    """``write(tmp)`` to a temporary name next to ``path`` (same extension, so matplotlib knows the format),
    flush it to disk, then rename it onto ``path``: a report being rewritten is the old one or the new one,
    never half of either. A failed write takes its temporary file with it."""
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------- content, once for both formats
@dataclass
class Span:
    """A piece of inline text, rendered alike in Markdown and HTML (the HTML adds the hover ``title``)."""

    text: str
    href: str | None = None  # a path relative to the report
    title: str | None = None  # shown on hover: a value's note, a job's command
    style: str = ""  # "", "strong", "em" or "code" (code is never used in a table: Markdown would show its \|)
    mark: str = ""  # right after the text: the partial mark
    sup: str = ""  # a published value's source number
    sub: Span | None = None  # a value's image count, a backbone's architecture


@dataclass
class Table:
    """A table whose cells are one :class:`Span` each; ``numeric`` columns are right-aligned."""

    header: list[str]
    numeric: list[bool]
    rows: list[list[Span]]


def report_blocks(report: dict, figure_files: dict[str, str]) -> list[tuple]:
    """The report as blocks: ``("h", level, text)``, ``("p", spans)``, ``("pre", text)``, ``("table", Table)``,
    ``("ul", [spans, ...])`` and ``("img", caption, path)``; sections without data are left out."""
    when = [Span(f"Created {report.get('created', '?')}, preset "), Span(str(report.get("preset", "?")), style="code"),
            Span(". Command:")]
    blocks = [("h", 1, report.get("title", "Report")), ("p", when), ("pre", report.get("command", ""))]
    blocks += results_blocks(report)
    blocks += cost_blocks(report.get("costs") or [])
    blocks += [("h", 2, "Figures")] if figure_files else []
    blocks += [("img", FIGURE_CAPTIONS[kind], path) for kind, path in figure_files.items()]
    blocks += picture_blocks(report.get("pictures") or [])
    blocks += jobs_blocks(report.get("jobs") or [])
    return blocks


PICTURE_CAPTIONS = {
    "attention": "the last block's class-token attention over the patches: image, mean of the heads, each head",
    "pca": "PCA of the final patch tokens (one per image): image, first component (red: the foreground it "
           "separates), the foreground's first three components as RGB",
}


def picture_blocks(pictures: list[dict]) -> list[tuple]:
    """What each backbone's features look like on a few val images (``tools/visualize.py``), or why not yet."""
    if not pictures:
        return []
    blocks = [("h", 2, "Feature pictures")]
    for row in pictures:
        blocks.append(("h", 3, row["backbone"]))
        drawn = [kind for kind in PICTURE_CAPTIONS if row.get(kind)]
        blocks += [("img", f"{row['backbone']}: {PICTURE_CAPTIONS[kind]}", row[kind]) for kind in drawn]
        if len(drawn) < len(PICTURE_CAPTIONS):
            blocks.append(("p", [Span("pictures: "), status_span(row["status"], row.get("log"))]))
    return blocks


LEGEND = [
    "↑ higher is better, ↓ lower is better.",
    "Each value links to its log; n= is the number of images it was measured on and links to the job's folder; "
    "hovering a value shows its note.",
    f"{PARTIAL_MARK} partial: the run did not cover everything planned (its note is under the table).",
    "— not planned or no data. failed and interrupted link to the log; running, queued and todo have no value "
    "yet.",
    "Published rows: the papers' numbers for the same model sizes; the superscript is the source's number.",
]


def results_blocks(report: dict) -> list[tuple]:
    """The results table in the paper's layout, then its notes, sources, legend and the backbones' origins."""
    columns = report.get("columns") or []
    header = ["backbone"] + [column_header(c) for c in columns]
    table = Table(header, [False] + [True] * len(columns), list(result_rows(report, columns)))
    blocks = [("h", 2, "Results"), ("table", table)]
    notes = cell_notes(report.get("rows") or [], columns)
    blocks += [("h", 3, "Notes"), ("ul", notes)] if notes else []
    sources = sorted((report.get("sources") or {}).items(), key=lambda kv: (len(str(kv[0])), str(kv[0])))  # 2, 10
    if sources:
        items = [[Span(str(key), style="strong"), Span(f" {text}")] for key, text in sources]
        blocks += [("h", 3, "Sources"), ("ul", items)]
    blocks += [("h", 3, "Legend"), ("ul", [[Span(line)] for line in LEGEND])]
    blocks += [("h", 3, "Backbones"), ("ul", [backbone_origin(row) for row in report.get("rows") or []])]
    return blocks


def column_header(column: dict) -> str:
    """``label (unit) ↑``; the unit is left out when the label already names it (``COCO AP box``)."""
    label, unit = column.get("label", column["key"]), column.get("unit", "")
    text = f"{label} ({unit})" if unit and unit not in label.split() else label
    return f"{text} {ARROWS.get(column.get('better'), '')}".rstrip()


def result_rows(report: dict, columns: list[dict]):
    """Per model size (in the order the backbones come): the backbones' rows, then the published rows."""
    rows, published = report.get("rows") or [], report.get("published") or []
    for size in dict.fromkeys(row.get("size") for row in rows):
        for row in (r for r in rows if r.get("size") == size):
            arch = Span(row["arch"]) if row.get("arch") else None
            yield [Span(row["backbone"], style="strong", sub=arch)] + [
                value_span(row.get("cells", {}).get(c["key"])) for c in columns]
        for pub in (p for p in published if p.get("size") == size):
            label = pub.get("label") or f"{pub.get('method', '?')} {size}"
            label += "" if "published" in label.lower() else " (published)"
            yield [Span(label, style="em")] + [published_span(pub.get("cells", {}).get(c["key"])) for c in columns]


def value_span(cell: dict | None) -> Span:
    """A backbone's cell: its value linked to its log, with its image count; otherwise its status."""
    cell = cell or {"status": "missing"}
    if cell.get("value") is None:
        return status_span(cell.get("status", "missing"), cell.get("log"))
    images = cell.get("images")
    count = Span(f"n={images:,}", href=cell.get("job_dir")) if images is not None else None
    return Span(number(cell["value"]), href=cell.get("log"), title=cell.get("note"), sub=count,
                mark=PARTIAL_MARK if cell.get("status") == "partial" else "")


def published_span(cell: dict | None) -> Span:
    """A published value with its source's number as a superscript, or ``—``."""
    if not cell or cell.get("value") is None:
        return Span("—")
    source = cell.get("source")
    return Span(number(cell["value"]), sup="" if source is None else str(source))


def status_span(status: str, log: str | None) -> Span:
    """A cell without a value: ``—`` for missing, else the status word, linked to the log when there is one."""
    return Span("—") if status == "missing" else Span(status, href=log)


def number(value) -> str:
    """A number as measured, to two decimals at most (three significant digits below 1: a micro model's
    GFLOPs), with thousands separators."""
    return f"{float(f'{value:.3g}'):,}" if abs(value) < 1 else f"{round(value, 2):,}"


def cell_notes(rows: list[dict], columns: list[dict]) -> list[list[Span]]:
    """One line for each cell whose note explains why its value is partial or absent (missing cells excepted:
    the legend says what ``—`` means)."""
    notes = []
    for row in rows:
        for column in columns:
            cell = row.get("cells", {}).get(column["key"]) or {}
            status = cell.get("status", "missing")
            if cell.get("note") and status not in ("done", "missing"):
                mark = PARTIAL_MARK if status == "partial" else ""
                notes.append([Span(row["backbone"], style="strong"),
                              Span(f", {column.get('label', column['key'])} ({status}{mark}): {cell['note']}")])
    return notes


def backbone_origin(row: dict) -> list[Span]:
    """Where a backbone comes from: its origin, architecture, input size and checkpoint."""
    spans = [Span(row["backbone"], style="strong"), Span(f": {row.get('origin', 'origin unknown')}")]
    if row.get("arch"):
        spans += [Span(", "), Span(row["arch"], style="code")]
    if row.get("img_size"):
        spans += [Span(f" at {row['img_size']} px")]
    if row.get("source"):
        spans += [Span(", from "), Span(str(row["source"]), style="code")]
    return spans


def cost_blocks(costs: list[dict]) -> list[tuple]:
    """What each backbone costs: parameters, FLOPs (and how counted), throughput, peak memory, device."""
    if not costs:
        return []
    header = ["backbone", "params (M)", "GFLOPs / image", "throughput (img/s)", "peak memory (GiB)", "device"]
    rows = [[Span(c["backbone"], style="strong"),
             measure(c, "params_m"),
             measure(c, "gflops_per_image"),
             measure(c, "throughput_img_per_s", batch_and_precision(c)),
             measure(c, "peak_memory_gib", c.get("memory_kind")),
             Span(c.get("device") or "—")] for c in costs]
    counting = next((c["flops_counting"] for c in costs if c.get("flops_counting")), None)
    return [("h", 2, "Cost"), ("table", Table(header, [False, True, True, True, True, False], rows)),
            *([("p", [Span(f"FLOPs: {counting}.")])] if counting else [])]


def batch_and_precision(cost: dict) -> str:
    """How the throughput was measured: ``batch 64, bf16`` (what of it is known)."""
    parts = [f"batch {cost['batch_size']}" if cost.get("batch_size") else "", cost.get("precision") or ""]
    return ", ".join(part for part in parts if part)


def measure(cost: dict, key: str, detail: str | None = None) -> Span:
    """One cost number linked to the measuring job's log, with how it was measured beneath it; without the
    number, the entry's status (``—`` when the entry is done but did not measure this)."""
    if cost.get(key) is None:
        status = cost.get("status", "missing")
        return status_span("missing" if status == "done" else status, cost.get("log"))
    return Span(number(cost[key]), href=cost.get("log"), sub=Span(detail) if detail else None)


def jobs_blocks(jobs: list[dict]) -> list[tuple]:
    """Every job of the plan: its name (linked to its log, its command on hover), state, progress, folder."""
    if not jobs:
        return []
    rows = [[Span(j["name"], href=j.get("log"), title=j.get("command")), Span(j.get("state", "?")),
             Span(j.get("progress") or ""), Span(j.get("job_dir") or "—", href=j.get("job_dir"))] for j in jobs]
    return [("h", 2, "Jobs"), ("table", Table(["job", "state", "progress", "folder"], [False] * 4, rows))]


# ----------------------------------------------------------------------------- Markdown
def to_markdown(blocks: list[tuple]) -> str:
    """The blocks as GitHub-flavoured Markdown."""
    return "\n\n".join(md_block(b) for b in blocks) + "\n"


def md_block(block: tuple) -> str:
    """One block as Markdown (a code block's fence is longer than any run of backticks in it)."""
    match block:
        case ("h", level, text):
            return f"{'#' * level} {md_escape(text)}"
        case ("p", spans):
            return md_spans(spans)
        case ("pre", text):
            fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
            return f"{fence}\n{text}\n{fence}"
        case ("table", table):
            lines = [[md_escape(h) for h in table.header],
                     ["---:" if numeric else "---" for numeric in table.numeric]]
            lines += [[md_span(cell) for cell in row] for row in table.rows]
            return "\n".join("| " + " | ".join(line) + " |" for line in lines)
        case ("ul", items):
            return "\n".join(f"- {md_spans(item)}" for item in items)
        case ("img", caption, path):
            return f"![{md_escape(caption)}]({quote(path)})"
    raise ValueError(f"unknown block {block[0]!r}")


def md_spans(spans: list[Span]) -> str:
    """Spans side by side."""
    return "".join(md_span(s) for s in spans)


def md_span(span: Span) -> str:
    """One span: emphasis, then the link (with its title), the mark, the superscript and the subscript."""
    text = md_escape(span.text)
    if span.style == "code":
        ticks = "`" * (1 + max((len(run) for run in re.findall(r"`+", span.text)), default=0))
        pad = " " if "`" in span.text else ""  # a code span may hold backticks: a longer fence, and spaces
        text = f"{ticks}{pad}{span.text}{pad}{ticks}"
    elif span.style:
        text = f"{'**' if span.style == 'strong' else '*'}{text}{'**' if span.style == 'strong' else '*'}"
    if span.href:
        title = ' "' + md_escape(span.title).replace('"', '\\"') + '"' if span.title else ""
        text = f"[{text}]({quote(span.href)}{title})"
    text += md_escape(span.mark)
    text += f"<sup>{md_escape(span.sup)}</sup>" if span.sup else ""
    return text + (f" <sub>{md_span(span.sub)}</sub>" if span.sub else "")


def md_escape(text: str) -> str:
    """Plain text that Markdown shows as it is: its markup characters (and a table's ``|``) backslash-escaped,
    line breaks as spaces (a table row is one line)."""
    return re.sub(r"([\\`*\[\]<>|])", r"\\\1", str(text)).replace("\r", " ").replace("\n", " ")


# ----------------------------------------------------------------------------- HTML
def to_html(blocks: list[tuple], title: str, out_dir: Path) -> str:
    """The blocks as one HTML file: inline CSS, the figures (read from ``out_dir``) as base64 data URIs."""
    body = "\n".join(html_block(b, out_dir) for b in blocks)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def html_block(block: tuple, out_dir: Path) -> str:
    """One block as HTML; a figure is read from ``out_dir`` and embedded."""
    match block:
        case ("h", level, text):
            return f"<h{level}>{esc(text)}</h{level}>"
        case ("p", spans):
            return f"<p>{html_spans(spans)}</p>"
        case ("pre", text):
            return f"<pre><code>{esc(text)}</code></pre>"
        case ("table", table):
            align = [' class="num"' if numeric else "" for numeric in table.numeric]
            head = "".join(f"<th{a}>{esc(h)}</th>" for a, h in zip(align, table.header))
            rows = "\n".join("<tr>" + "".join(f"<td{a}>{html_span(c)}</td>" for a, c in zip(align, row)) + "</tr>"
                             for row in table.rows)
            return f'<div class="scroll"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}\n</tbody>\n' \
                   f"</table></div>"
        case ("ul", items):
            return "<ul>\n" + "\n".join(f"<li>{html_spans(item)}</li>" for item in items) + "\n</ul>"
        case ("img", caption, path):
            data = base64.b64encode((out_dir / path).read_bytes()).decode("ascii")
            return (f'<figure><img src="data:image/png;base64,{data}" alt="{esc(caption)}">'
                    f"<figcaption>{esc(caption)}</figcaption></figure>")
    raise ValueError(f"unknown block {block[0]!r}")


def html_spans(spans: list[Span]) -> str:
    """Spans side by side."""
    return "".join(html_span(s) for s in spans)


def html_span(span: Span) -> str:
    """One span as HTML; every string from the report is escaped, links are relative paths, URL-quoted."""
    text = esc(span.text)
    if span.style:
        text = f"<{span.style}>{text}</{span.style}>"
    title = f' title="{esc(span.title)}"' if span.title else ""
    if span.href:
        text = f'<a href="{esc(quote(span.href))}"{title}>{text}</a>'
    elif title:
        text = f"<span{title}>{text}</span>"
    text += esc(span.mark)
    text += f"<sup>{esc(span.sup)}</sup>" if span.sup else ""
    return text + (f" <sub>{html_span(span.sub)}</sub>" if span.sub else "")


def esc(text) -> str:
    """Any value as HTML text, quotes included (it may sit in an attribute)."""
    return html.escape(str(text), quote=True)


# ----------------------------------------------------------------------------- figures
def draw_figures(report: dict, out_dir: Path) -> dict[str, str]:
    """Draw each kind of ``report["figures"]`` that has data into ``figures/<kind>.png``, every backbone
    overlaid in one colour throughout; a kind without data has no figure (an older one is removed, so the
    folder matches the report). Returns the written paths by kind, relative to ``out_dir``."""
    series = report.get("figures") or {}
    colors = backbone_colors(report)
    drawers = {kind: partial(draw_curves, spec=spec) for kind, spec in CURVES.items()}
    drawers |= {"robustness": draw_robustness, "detection": draw_detection}
    written = {}
    with plt.rc_context(FIGURE_STYLE):
        for kind, draw in drawers.items():
            path = out_dir / "figures" / f"{kind}.png"
            fig = draw(series.get(kind) or {}, colors)
            if fig is None:
                path.unlink(missing_ok=True)
                continue
            path.parent.mkdir(exist_ok=True)
            atomic_write(path, partial(save_figure, fig))
            written[kind] = f"figures/{kind}.png"
    return written


def backbone_colors(report: dict) -> dict[str, str]:
    """One colour per backbone: the table's backbones first, then any other that a figure names."""
    names = [row["backbone"] for row in report.get("rows") or []]
    names += [name for kind in (report.get("figures") or {}).values() for name in (kind or {})]
    return {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(names))}


def draw_curves(series: dict, colors: dict, spec: tuple):
    """Curves of a run (loss, top-1) against step or epoch, one panel per quantity that any backbone has."""
    title, xlabel, panels = spec
    panels = [(key, label) for key, label in panels if any(curves.get(key) for curves in series.values())]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.0), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for backbone, curves in series.items():
            if curves.get(key):
                xy = np.asarray(curves[key], dtype=float)  # a None value (not measured there) becomes a gap
                ax.plot(xy[:, 0], xy[:, 1], color=colors[backbone], label=backbone, lw=1.5,
                        marker="o" if len(xy) <= 30 else None, ms=3)
        ax.set(xlabel=xlabel, ylabel=label, title=f"{title}: {label}")
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def draw_robustness(series: dict, colors: dict):
    """ImageNet-C: one group of horizontal bars per corruption, one bar per backbone."""
    series = {backbone: errors for backbone, errors in series.items() if errors}
    if not series:
        return None
    corruptions = list(dict.fromkeys(c for errors in series.values() for c in errors))
    height = max(2.2, 0.8 + len(corruptions) * (0.1 + 0.1 * len(series)))
    fig, ax = plt.subplots(figsize=(6.5, height))
    grouped_bars(ax, corruptions, series, colors, horizontal=True)
    ax.set_yticks(range(len(corruptions)), [c.replace("_", " ") for c in corruptions])
    ax.invert_yaxis()  # the first corruption on top, as in the tables
    ax.set(xlabel="top-1 error (%)", title="ImageNet-C: error per corruption (lower is better)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend()
    return fig


def draw_detection(series: dict, colors: dict):
    """COCO: AP of small, medium and large objects, box and mask panels, one bar per backbone (labelled)."""
    tasks = [task for task in ("box", "mask") if any((aps or {}).get(task) for aps in series.values())]
    if not tasks:
        return None
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.0), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        grouped_bars(ax, list(OBJECT_SIZES), {b: (aps or {}).get(task) or {} for b, aps in series.items()}, colors)
        ax.set_xticks(range(len(OBJECT_SIZES)), [f"{k}\n({v})" for k, v in OBJECT_SIZES.items()])
        for bars in ax.containers:
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set(ylabel="AP", title=f"COCO {task} AP per object size")
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    return fig


def grouped_bars(ax, groups: list[str], values: dict, colors: dict, horizontal: bool = False) -> None:
    """One bar per backbone in each group, side by side, centred on the group's tick; a backbone without any
    value here takes no slot, one without some value leaves its slot empty. The grid stays behind the bars."""
    values = {backbone: by_group for backbone, by_group in values.items()
              if any(by_group.get(g) is not None for g in groups)}
    width = 0.8 / max(1, len(values))
    ax.set_axisbelow(True)
    for i, (backbone, by_group) in enumerate(values.items()):
        slots = [(j + (i - (len(values) - 1) / 2) * width, by_group[g])
                 for j, g in enumerate(groups) if by_group.get(g) is not None]
        positions, heights = zip(*slots)
        (ax.barh if horizontal else ax.bar)(positions, heights, width, color=colors[backbone], label=backbone)
