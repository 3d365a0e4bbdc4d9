"""One HTML page that shows what a job found: no server, no network, no JavaScript library.

Counts per class, the histogram of scores, keypoint counts (keypoint models:
detections with keypoints, visible keypoints per name), the job's pace and a few
overlays, drawn here (inline SVG; overlays as PNG data URIs) from DEST's
public output only: the rows under ``data/`` and each file's metadata, read
a record batch at a time, so an archive of millions of rows fits in memory.
"""

from __future__ import annotations

import base64
import html
import io
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from segbatch import __version__
from segbatch.storage import Storage

from .results import files_metadata, iter_batches, layout_of

SCORE_BINS = 20


@dataclass
class Summary:
    """What the page shows, gathered in one pass over the rows."""

    images: int = 0
    errors: int = 0
    detections: int = 0
    per_class: Counter = field(default_factory=Counter)
    score_histogram: np.ndarray = field(default_factory=lambda: np.zeros(SCORE_BINS, dtype=np.int64))
    error_causes: Counter = field(default_factory=Counter)
    pace: list[tuple[float, int]] = field(default_factory=list)  # (seconds since the first shard began, images done)
    metadata: dict[str, Any] = field(default_factory=dict)
    keypoint_detections: int = 0  # detections that carry keypoints (keypoint models)
    visible_keypoints: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # per keypoint index

    def keypoint_names(self) -> tuple[str, ...]:
        """The model's keypoint names (the file metadata's), one per counted index."""
        layout = layout_of(self.metadata)
        names = layout.names if layout else ()
        return names + tuple(f"#{i}" for i in range(len(names), len(self.visible_keypoints)))


def summarize(dest: str, storage: Storage) -> Summary:
    """Counts, score histogram, error causes and pace of DEST's results."""
    s = Summary()
    for batch in iter_batches(dest, storage, columns=["status", "error", "detections"]):
        s.images += batch.num_rows
        errors = [e for e in batch.column("error").to_pylist() if e]
        s.errors += len(errors)
        s.error_causes.update(e.split(":", 1)[0].strip() for e in errors)
        flat = pc.list_flatten(batch.column("detections"))
        if len(flat) == 0:
            continue
        s.detections += len(flat)
        for item in pc.value_counts(flat.field("label_name")).to_pylist():
            s.per_class[item["values"]] += item["counts"]
        scores = flat.field("score").to_numpy(zero_copy_only=False)
        s.score_histogram += np.histogram(scores, bins=SCORE_BINS, range=(0.0, 1.0))[0]
        with_keypoints, visible = count_keypoints(flat.field("keypoints"))
        s.keypoint_detections += with_keypoints
        s.visible_keypoints = _add(s.visible_keypoints, visible)
    metadata = files_metadata(dest, storage)
    s.metadata = metadata[0] if metadata else {}
    s.pace = pace(metadata)
    return s


def count_keypoints(keypoints: pa.Array) -> tuple[int, np.ndarray]:
    """Of a column of detections' ``keypoints`` (null for mask models): how many
    detections have keypoints, and how many of them are visible at each keypoint index."""
    with_keypoints = len(keypoints) - keypoints.null_count
    if with_keypoints == 0:
        return 0, np.zeros(0, dtype=np.int64)
    lengths = pc.list_value_length(keypoints).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(keypoints)  # null lists give nothing
    index = np.arange(len(values)) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # position in its list
    visible = values.field("visible").fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
    return with_keypoints, np.bincount(index[visible], minlength=int(lengths.max())).astype(np.int64)


def _add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros(max(len(a), len(b)), dtype=np.int64)
    out[: len(a)] += a
    out[: len(b)] += b
    return out


def pace(file_metadata: list[dict[str, Any]]) -> list[tuple[float, int]]:
    """Images done over time, from the ``shard`` block of each file's metadata."""
    shards = sorted((m["shard"] for m in file_metadata if "shard" in m), key=lambda sh: sh["finished"])
    if not shards:
        return []
    start = min(sh["started"] for sh in shards)
    done, points = 0, [(0.0, 0)]
    for sh in shards:
        done += sh["images"]
        points.append((sh["finished"] - start, done))
    return points


def html_page(s: Summary, overlays: list[tuple[str, bytes]], title: str) -> str:
    """The report page: ``overlays`` are (caption, PNG bytes)."""
    wall = s.pace[-1][0] if s.pace else 0.0
    rate = f"{s.images / wall:.2f} images/s over {wall:.0f} s" if wall > 0 else "-"
    meta = s.metadata
    thresholds = meta.get("thresholds", {})
    facts = [
        ("images", f"{s.images:,}"),
        ("with errors", f"{s.errors:,}"),
        ("detections", f"{s.detections:,}"),
        ("pace", rate),
        ("model", f"{meta.get('model_id', '-')} (weights {meta.get('weights_hash', '-')})"),
        ("score threshold", str(thresholds.get("score_threshold", "-"))),
        ("mask threshold", str(thresholds.get("mask_threshold", "-"))),
    ]
    keypoint_model = s.keypoint_detections > 0 or layout_of(meta) is not None
    if keypoint_model:
        facts.insert(3, ("detections with keypoints", f"{s.keypoint_detections:,}"))
    keypoints_html = (
        f"<h2>Visible keypoints</h2>\n{keypoint_bars(s.keypoint_names(), s.visible_keypoints, s.keypoint_detections)}"
        if keypoint_model
        else ""
    )
    facts_html = "".join(
        f'<tr><th>{html.escape(k)}</th><td data-fact="{html.escape(k)}">{html.escape(v)}</td></tr>' for k, v in facts
    )
    causes = "".join(
        f'<tr><td>{html.escape(cause)}</td><td class="num">{n:,}</td></tr>'
        for cause, n in s.error_causes.most_common(10)
    )
    figures = "".join(
        f'<figure><img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for caption, png in overlays
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; max-width: 1100px; }}
h1 {{ font-size: 1.5em; }} h2 {{ font-size: 1.15em; margin-top: 2em; }}
table {{ border-collapse: collapse; }} th, td {{ padding: 2px 12px 2px 0; text-align: left; }}
td.num {{ text-align: right; }} svg text {{ font: 11px system-ui, sans-serif; fill: #333; }}
figure {{ display: inline-block; margin: 0 12px 12px 0; max-width: 520px; }}
figure img {{ max-width: 100%; border: 1px solid #ccc; }}
figcaption {{ font-size: 12px; color: #555; word-break: break-all; }}
</style></head>
<body>
<h1>{html.escape(title)}</h1>
<table id="facts">{facts_html}</table>
<h2>Detections per class</h2>
{class_bars(s.per_class)}
<h2>Scores</h2>
{score_histogram(s.score_histogram)}
{keypoints_html}
<h2>Pace</h2>
{pace_chart(s.pace)}
<h2>Errors by cause</h2>
<table id="errors">{causes or "<tr><td>none</td></tr>"}</table>
<h2>Overlays</h2>
<div id="overlays">{figures or "<p>none</p>"}</div>
<p style="color:#888">segbatch {html.escape(__version__)}, {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}</p>
<script>
// Tells a test (or a curious reader) how many overlays the browser really decoded.
window.addEventListener("load", () => {{
  document.body.dataset.imagesDecoded = [...document.images].filter(i => i.complete && i.naturalWidth > 0).length;
}});
</script>
</body></html>
"""


def class_bars(per_class: Counter, width: int = 640) -> str:
    """Horizontal bars, most frequent class first."""
    items = per_class.most_common(30)
    if not items:
        return "<p>no detections</p>"
    bars = [(str(name), n, f"{n:,}") for name, n in items]
    return _bars("classes", "bar", "data-label", "#4a7fb5", bars, items[0][1], width, room=70)


def keypoint_bars(names: tuple[str, ...], visible: np.ndarray, detections: int, width: int = 640) -> str:
    """Horizontal bars in the model's keypoint order: how many detections show each keypoint."""
    if detections == 0:
        return "<p>no detections with keypoints</p>"
    counts = [int(visible[i]) if i < len(visible) else 0 for i in range(len(names))]
    bars = [(name, n, f"{n:,} ({100 * n / detections:.0f}%)") for name, n in zip(names, counts)]
    return _bars("keypoints", "kp-bar", "data-keypoint", "#8a5ab5", bars, detections, width, room=140)


def _bars(
    svg_id: str, css: str, attr: str, fill: str, bars: list[tuple[str, int, str]], full: int, width: int, room: int
) -> str:
    """An SVG ``width`` px wide of labelled horizontal bars (name, count, its text): a count of ``full``
    fills what the labels and ``room`` px for the text leave; each bar carries its name and count
    (``attr``, ``data-count``) for the page's tests."""
    row, label_w = 20, 140
    parts = []
    for i, (name, n, text) in enumerate(bars):
        w = max(1.0, (width - label_w - room) * n / full)
        y = i * row
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end">{html.escape(name)}</text>'
            f'<rect class="{css}" {attr}="{html.escape(name)}" data-count="{n}" x="{label_w}" y="{y + 3}" '
            f'width="{w:.1f}" height="{row - 6}" fill="{fill}"/>'
            f'<text x="{label_w + w + 6:.1f}" y="{y + 14}">{text}</text>'
        )
    return f'<svg id="{svg_id}" width="{width}" height="{len(bars) * row}">{"".join(parts)}</svg>'


def score_histogram(counts: np.ndarray, width: int = 640, height: int = 180) -> str:
    """Vertical bars over [0, 1] in ``len(counts)`` bins."""
    if counts.sum() == 0:
        return "<p>no detections</p>"
    top, pad, n = int(counts.max()), 30, len(counts)
    bw = (width - 2 * pad) / n
    bars = []
    for i, c in enumerate(counts.tolist()):
        h = (height - 2 * pad) * c / top
        bars.append(
            f'<rect class="hist-bar" data-bin="{i}" data-count="{c}" x="{pad + i * bw:.1f}" y="{height - pad - h:.1f}" '
            f'width="{bw - 1:.1f}" height="{h:.1f}" fill="#5a9e6f">'
            f"<title>{i / n:.2f}-{(i + 1) / n:.2f}: {c:,}</title></rect>"
        )
    axis = "".join(
        f'<text x="{pad + k * (width - 2 * pad) / 4:.1f}" y="{height - pad + 14}" '
        f'text-anchor="middle">{k / 4:.2f}</text>'
        for k in range(5)
    )
    return (
        f'<svg id="scores" width="{width}" height="{height}">{"".join(bars)}{axis}'
        f'<text x="{pad}" y="{pad - 10}">max {top:,} detections in a bin</text></svg>'
    )


def pace_chart(points: list[tuple[float, int]], width: int = 640, height: int = 200) -> str:
    """Images done over time (one point per committed shard)."""
    if len(points) < 2:
        return "<p>no pace recorded</p>"
    pad = 40
    t_max = max(points[-1][0], 1e-9)
    n_max = max(points[-1][1], 1)
    xy = " ".join(
        f"{pad + (width - 2 * pad) * t / t_max:.1f},{height - pad - (height - 2 * pad) * n / n_max:.1f}"
        for t, n in points
    )
    return (
        f'<svg id="pace" data-points="{len(points)}" width="{width}" height="{height}">'
        f'<polyline points="{xy}" fill="none" stroke="#b5654a" stroke-width="2"/>'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#999"/>'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#999"/>'
        f'<text x="{width - pad}" y="{height - pad + 16}" text-anchor="end">{t_max:.0f} s</text>'
        f'<text x="{pad + 4}" y="{pad - 6}">{n_max:,} images</text></svg>'
    )


def write_report(
    dest: str, out: str, storage: Storage, overlays: int = 4, seed: int = 0, max_width: int = 640
) -> tuple[str, Summary]:
    """Write the report of DEST to ``out`` (a path or URL); returns ``out`` and the summary."""
    from .render import render_rows

    summary = summarize(dest, storage)
    pictures = []
    for caption, image in render_rows(dest, storage, count=overlays, seed=seed):
        if image.width > max_width:
            image = image.resize((max_width, round(image.height * max_width / image.width)))
        buf = io.BytesIO()
        image.save(buf, format="PNG", optimize=True)
        pictures.append((caption, buf.getvalue()))
    page = html_page(summary, pictures, f"segbatch report: {dest}")
    storage.write_bytes(out, page.encode("utf-8"))
    return out, summary
