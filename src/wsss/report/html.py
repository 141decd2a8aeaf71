"""``runs/<name>/report/index.html``: one self-contained page showing what a run produced.

The page holds, top to bottom:

- a title naming the run, method, backbone, localizer and dataset;
- the headline numbers of ``metrics.json`` as a table: per split the classifier mAP, the mIoU / class-average /
  pixel accuracy of the maps turned into masks, the mIoU of the pseudo masks as written, and the background
  threshold with the split it was chosen on;
- the label check of the training split (wsss.data.label_check: classes on nearly every image, per-class image and
  pixel shares) and the trivial baselines of every scored split (wsss.evaluation.baselines), whose best is also a
  column of the headline table;
- per-class IoU as a horizontal bar chart (inline SVG): the pseudo masks, and the maps of the test split when scored,
  each bar with a dark tick at the best trivial baseline's IoU for that class on the bar's split;
- the threshold sweep (inline SVG): mIoU against the threshold for every scored split, plus the fraction of
  labelled pixels kept (coverage, dashed) when the dataset has no background class, and the best trivial baseline
  of each split as a dotted horizontal reference line;
- per image (the first N of the pseudo split, then of the test split when it has maps): the photo, the localization
  map of each of the image's classes as a heat overlay, the pseudo mask (for the test split: the maps turned into a
  mask by the same rule), the segmentation prediction (``pred/<split>/<id>.png``, once it exists) and the ground
  truth, side by side, masks in the dataset's palette with ignore pixels white;
- the resolved config, folded.

Every picture is a base64 data URI, no script, style or font is fetched, and a Content-Security-Policy forbids any
fetch, so the file can be copied or mailed anywhere. A small inline script marks ``<body>`` with
``data-ready="1"``, ``data-images-loaded`` / ``data-images-total`` and ``data-js-errors`` once the page has loaded,
so a headless browser can check that it renders.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from wsss.data.spec import DatasetSpec
from wsss.errors import DataError, WsssError
from wsss.evaluation.baselines import BASELINES, DESCRIPTIONS, LABELS
from wsss.layout import MAPS, PSEUDO, RunLayout
from wsss.runs import atomic_write_text

log = logging.getLogger("wsss.report")

#: pictures are stored at most this many pixels wide (and high)
MAX_SIDE = 240
#: pictures are shown this many CSS pixels high (small images are enlarged, masks without smoothing)
TILE_HEIGHT = 150
#: weight of the heat map in the CAM overlays
OVERLAY_ALPHA = 0.5

SERIES_COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f")


# -- small helpers ----------------------------------------------------------------------------------------------------
def _e(value) -> str:
    """Escaped text for element content and attribute values."""
    return html.escape(str(value), quote=True)


def _num(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (int, float)):
        return f"{value:.{digits}f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)
    return str(value)


def _fit(w: int, h: int, side: int = MAX_SIDE) -> tuple[int, int]:
    """(w, h) scaled down to fit a side x side box; never enlarged."""
    s = min(1.0, side / max(w, 1), side / max(h, 1))
    return max(1, round(w * s)), max(1, round(h * s))


def _data_uri(img: Image.Image, fmt: str) -> str:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.convert("RGB").save(buf, format="JPEG", quality=85)
        mime = "image/jpeg"
    else:
        img.save(buf, format="PNG", optimize=True)
        mime = "image/png"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def jet(x: np.ndarray) -> np.ndarray:
    """Jet-like colour map: values in [0, 1] -> uint8 RGB (dark blue, blue, cyan, yellow, red, dark red)."""
    x = np.clip(np.nan_to_num(np.asarray(x, np.float32)), 0.0, 1.0)[..., None]
    centres = np.array([3.0, 2.0, 1.0], np.float32)  # r, g, b
    rgb = np.clip(1.5 - np.abs(4.0 * x - centres), 0.0, 1.0)
    return (rgb * 255 + 0.5).astype(np.uint8)


def overlay(photo: np.ndarray, heat: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Alpha-blend the jet colouring of ``heat`` (H, W) in [0, 1] over ``photo`` (H, W, 3) uint8."""
    blended = (1.0 - alpha) * photo.astype(np.float32) + alpha * jet(heat).astype(np.float32)
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def _resize_map(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if (m.shape[1], m.shape[0]) == size:
        return m.astype(np.float32)
    return np.asarray(Image.fromarray(m.astype(np.float32), mode="F").resize(size, Image.BILINEAR))


def _mask_uri(mask: np.ndarray, spec: DatasetSpec, size: tuple[int, int]) -> str:
    """Class-index mask -> palette PNG data URI in the spec's colours (ignore white), resized (nearest) to ``size``."""
    img = Image.fromarray(np.asarray(mask, np.uint8), mode="P")
    if img.size != size:
        img = img.resize(size, Image.NEAREST)
    img.putpalette(spec.palette_bytes())
    return _data_uri(img, "PNG")


def _jet_gradient_css(stops: int = 9) -> str:
    cols = jet(np.linspace(0, 1, stops))
    return "linear-gradient(to right, " + ", ".join(f"rgb({r},{g},{b})" for r, g, b in cols) + ")"


# -- what the page shows ----------------------------------------------------------------------------------------------
@dataclass
class Tile:
    """One picture of an image row, or a placeholder text where there is none."""

    caption: str
    uri: str | None = None
    note: str | None = None
    #: (w, h) of the picture, also the box of a placeholder
    size: tuple[int, int] = (MAX_SIDE, MAX_SIDE * 3 // 4)
    #: a mask: enlarged without smoothing
    mask: bool = False


@dataclass
class ImageRow:
    id: str
    labels: list[str]
    tiles: list[Tile] = field(default_factory=list)
    error: str | None = None


@dataclass
class ImageGroup:
    split: str
    title: str
    total: int
    rows: list[ImageRow] = field(default_factory=list)
    note: str | None = None


# -- charts -----------------------------------------------------------------------------------------------------------
def bar_chart_svg(classes: Sequence[str], series: Sequence[tuple[str, str, dict]],
                  references: dict[str, dict] | None = None, reference_label: str = "reference") -> str:
    """Horizontal per-class IoU bars. ``series``: (key, label, {class name: IoU in percent or None}); one bar per class
    and series (none drawn for an undefined IoU, 'n/a' written instead). ``references``: {series key: {class name:
    IoU}}, drawn as a dark vertical line across that series' bar of each class (``reference_label`` in the legend)."""
    classes = list(classes)
    references = {k: v for k, v in (references or {}).items() if v}
    n = max(len(series), 1)
    longest = max((len(c) for c in classes), default=4)
    label_w = int(min(220, max(70, 12 + 6.6 * longest)))
    bar_w, bh, gap, pad = 380, 12, 2, 8
    group_h = n * (bh + gap) - gap + pad
    # legend: one line per series (and one for the references), so a long name is never cut off at the chart's edge
    legend_rows = len(series) + bool(references)
    top = 16 * legend_rows + 16
    height = top + len(classes) * group_h + 38
    longest_label = max([len(label) for _k, label, _ in series] + [len(reference_label)] * bool(references), default=0)
    width = max(label_w + bar_w + 56, label_w + 17 + int(6.6 * longest_label) + 8)
    out = [f'<svg class="chart bars" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="per-class IoU">']
    for j, (_key, label, _) in enumerate(series):
        colour = SERIES_COLOURS[j % len(SERIES_COLOURS)]
        y = 8 + 16 * j
        out.append(f'<rect x="{label_w}" y="{y}" width="12" height="12" fill="{colour}"/>'
                   f'<text x="{label_w + 17}" y="{y + 10}" class="legend">{_e(label)}</text>')
    if references:
        y = 8 + 16 * len(series)
        out.append(f'<line x1="{label_w + 6}" y1="{y - 1}" x2="{label_w + 6}" y2="{y + 13}" class="baseline"/>'
                   f'<text x="{label_w + 17}" y="{y + 10}" class="legend">{_e(reference_label)}</text>')
    # grid
    y_end = top + len(classes) * group_h
    for t in range(0, 101, 20):
        gx = label_w + bar_w * t / 100
        out.append(f'<line x1="{gx:.1f}" y1="{top - 4}" x2="{gx:.1f}" y2="{y_end}" class="grid"/>'
                   f'<text x="{gx:.1f}" y="{y_end + 16}" class="tick" text-anchor="middle">{t}</text>')
    out.append(f'<text x="{label_w + bar_w / 2}" y="{y_end + 30}" class="tick" text-anchor="middle">IoU (%)</text>')
    for i, name in enumerate(classes):
        y0 = top + i * group_h
        out.append(f'<text x="{label_w - 6}" y="{y0 + (group_h - pad) / 2 + 4:.1f}" text-anchor="end" '
                   f'class="label">{_e(name)}</text>')
        for j, (key, label, values) in enumerate(series):
            colour = SERIES_COLOURS[j % len(SERIES_COLOURS)]
            v = values.get(name)
            y = y0 + j * (bh + gap)
            if v is None:
                out.append(f'<text x="{label_w + 4}" y="{y + bh - 2}" class="value na">n/a</text>')
            else:
                w = bar_w * max(0.0, min(100.0, float(v))) / 100
                out.append(f'<rect class="bar" data-series="{_e(key)}" data-class="{_e(name)}" x="{label_w}" y="{y}" '
                           f'width="{w:.1f}" height="{bh}" fill="{colour}"><title>{_e(name)}, {_e(label)}: '
                           f'{_num(v)}</title></rect>'
                           f'<text x="{label_w + w + 4:.1f}" y="{y + bh - 2}" class="value">{_num(v, 1)}</text>')
            ref = references.get(key, {}).get(name)
            if ref is not None:  # drawn over the bar
                rx = label_w + bar_w * max(0.0, min(100.0, float(ref))) / 100
                out.append(f'<line class="baseline" data-series="{_e(key)}" data-class="{_e(name)}" x1="{rx:.1f}" '
                           f'y1="{y - 1}" x2="{rx:.1f}" y2="{y + bh + 1}"><title>{_e(name)}, {_e(reference_label)}: '
                           f'{_num(ref)}</title></line>')
    out.append("</svg>")
    return "".join(out)


def sweep_chart_svg(sweeps: dict[str, list[dict]], coverage: bool, chosen: float | None = None,
                    x_label: str = "threshold", references: dict[str, float] | None = None,
                    reference_label: str = "reference", x_ticks: Sequence[float] | None = None) -> str:
    """mIoU (solid) and, with ``coverage``, the coverage (dashed) against the threshold, one colour per split.
    ``references``: {split: mIoU}, drawn as a horizontal dotted line in the split's colour (``reference_label``).
    ``x_ticks``: where to mark the x axis (default: six even steps)."""
    references = {k: v for k, v in (references or {}).items() if v is not None and k in sweeps}
    width, height = 660, 300
    ml, mr, mt, mb = 48, 20, 16, 46
    pw, ph = width - ml - mr, height - mt - mb
    ts = [r["threshold"] for rows in sweeps.values() for r in rows]
    x0, x1 = (0.0, 1.0) if ts and min(ts) >= 0 and max(ts) <= 1 else (min(ts, default=0.0), max(ts, default=1.0))
    if x1 <= x0:
        x1 = x0 + 1
    keys = ["miou"] + (["coverage"] if coverage else [])
    vals = [r[k] for rows in sweeps.values() for r in rows for k in keys if r.get(k) is not None]
    vals += list(references.values())
    top_val = min(100.0, max(vals, default=10.0))
    step = next(st for st in (2, 5, 10, 20, 25) if top_val / st <= 6)
    ymax = max(step, math.ceil(top_val / step) * step)

    def px(t):
        return ml + pw * (t - x0) / (x1 - x0)

    def py(v):
        return mt + ph * (1 - v / ymax)

    out = [f'<svg class="chart sweep" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="threshold sweep">']
    for k in range(int(round(ymax / step)) + 1):
        v = step * k
        out.append(f'<line x1="{ml}" y1="{py(v):.1f}" x2="{ml + pw}" y2="{py(v):.1f}" class="grid"/>'
                   f'<text x="{ml - 6}" y="{py(v) + 4:.1f}" class="tick" text-anchor="end">{v:g}</text>')
    for t in (x_ticks if x_ticks is not None else [x0 + (x1 - x0) * k / 5 for k in range(6)]):
        out.append(f'<line x1="{px(t):.1f}" y1="{mt + ph}" x2="{px(t):.1f}" y2="{mt + ph + 4}" class="axis"/>'
                   f'<text x="{px(t):.1f}" y="{mt + ph + 17}" class="tick" text-anchor="middle">{t:g}</text>')
    out.append(f'<line x1="{ml}" y1="{mt + ph}" x2="{ml + pw}" y2="{mt + ph}" class="axis"/>'
               f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{mt + ph}" class="axis"/>'
               f'<text x="{ml + pw / 2}" y="{height - 8}" class="tick" text-anchor="middle">{_e(x_label)}</text>'
               f'<text x="12" y="{mt + ph / 2}" class="tick" text-anchor="middle" '
               f'transform="rotate(-90 12 {mt + ph / 2})">%</text>')
    if chosen is not None and x0 <= chosen <= x1:
        out.append(f'<line class="chosen" x1="{px(chosen):.1f}" y1="{mt}" x2="{px(chosen):.1f}" y2="{mt + ph}"/>'
                   f'<text x="{px(chosen) + 4:.1f}" y="{mt + 12}" class="tick">chosen: {chosen:g}</text>')
    legend = []
    for j, (split, rows) in enumerate(sweeps.items()):
        colour = SERIES_COLOURS[j % len(SERIES_COLOURS)]
        for key, dash in (("miou", ""), ("coverage", ' stroke-dasharray="6 4"')):
            if key not in keys:
                continue
            pts = [(r["threshold"], r[key]) for r in rows if r.get(key) is not None]
            if not pts:
                continue
            poly = " ".join(f"{px(t):.1f},{py(v):.1f}" for t, v in pts)
            out.append(f'<polyline class="line {key}" data-split="{_e(split)}" points="{poly}" fill="none" '
                       f'stroke="{colour}" stroke-width="2"{dash}/>')
            for t, v in pts:
                out.append(f'<circle cx="{px(t):.1f}" cy="{py(v):.1f}" r="2.5" fill="{colour}">'
                           f'<title>{_e(split)} {key} at {t:g}: {_num(v)}</title></circle>')
            style = "dashed" if dash else "solid"
            legend.append(f'<span><span class="line-swatch" style="border-top: 2px {style} {colour}"></span>'
                          f"{_e(split)} {'mIoU' if key == 'miou' else 'coverage'}</span>")
        ref = references.get(split)
        if ref is not None:
            out.append(f'<line class="baseline" data-split="{_e(split)}" x1="{ml}" y1="{py(ref):.1f}" x2="{ml + pw}" '
                       f'y2="{py(ref):.1f}" stroke="{colour}" stroke-width="1.5" stroke-dasharray="2 3">'
                       f"<title>{_e(split)} {_e(reference_label)}: {_num(ref)}</title></line>")
            legend.append(f'<span><span class="line-swatch" style="border-top: 2px dotted {colour}"></span>'
                          f"{_e(split)} {_e(reference_label)} ({_num(ref, 1)})</span>")
    out.append("</svg>")
    return '<div class="legendbar">' + "".join(legend) + "</div>" + "".join(out)


# -- page -------------------------------------------------------------------------------------------------------------
CSS = """
:root { --fg: #1d2329; --muted: #5d6b78; --line: #d9dee3; --bg: #ffffff; --panel: #f5f7f9; }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px 32px 48px; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto,
       "DejaVu Sans", sans-serif; color: var(--fg); background: var(--bg); }
h1 { font-size: 22px; margin: 0 0 4px; }
h1 .what { font-weight: 400; color: var(--muted); }
h2 { font-size: 17px; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 22px 0 8px; }
.sub { color: var(--muted); margin: 0 0 4px; }
.note { color: var(--muted); }
.warn { color: #a33; }
table.metrics { border-collapse: collapse; margin: 8px 0; }
table.metrics th, table.metrics td { padding: 5px 12px; border-bottom: 1px solid var(--line); text-align: right; }
table.metrics th:first-child, table.metrics td:first-child { text-align: left; }
table.metrics thead th { background: var(--panel); font-weight: 600; }
table.metrics tr.pseudo td, table.metrics tr.seg td { font-weight: 600; }
table.metrics td .note { font-weight: 400; font-size: 12px; }
table.metrics td.below { color: #a33; }
table.metrics td.best { font-weight: 600; }
svg.chart { display: block; max-width: 100%; height: auto; font-size: 12px; }
svg .grid { stroke: #e6e9ec; stroke-width: 1; }
svg .axis { stroke: #8a96a1; stroke-width: 1; }
svg .chosen { stroke: #555; stroke-width: 1.2; stroke-dasharray: 3 3; }
svg.bars .baseline { stroke: #1d2329; stroke-width: 2; }
svg text { fill: var(--fg); }
svg .tick, svg .value { fill: var(--muted); font-size: 11px; }
svg .na { font-style: italic; }
.legendbar { display: flex; flex-wrap: wrap; gap: 6px 16px; align-items: center; margin: 6px 0 14px; }
.swatch { display: inline-block; width: 14px; height: 14px; border: 1px solid #9aa5af; vertical-align: -2px;
          margin-right: 5px; }
.line-swatch { display: inline-block; width: 24px; height: 0; vertical-align: 4px; margin-right: 5px; }
.jet { display: inline-block; width: 160px; height: 12px; vertical-align: -1px; margin: 0 6px;
       border: 1px solid #9aa5af; }
.row { margin: 0 0 16px; padding: 10px 12px; background: var(--panel); border-radius: 6px; }
.row .head { margin-bottom: 6px; }
.row .head b { font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
.tiles { display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; }
figure { margin: 0; }
figure img, figure .placeholder { display: block; height: TILE_HEIGHTpx; width: auto; border-radius: 3px;
                                  background: #fff; }
figure img.mask { image-rendering: pixelated; }
figure .placeholder { display: flex; align-items: center; justify-content: center; text-align: center;
                      border: 1px dashed #aab4bd; color: var(--muted); font-size: 12px; padding: 6px; }
figcaption { font-size: 12px; color: var(--muted); margin-top: 3px; max-width: 260px; }
details pre { background: var(--panel); padding: 10px; overflow: auto; font-size: 12px; }
""".replace("TILE_HEIGHT", str(TILE_HEIGHT))

# records script errors and, once everything has loaded, how many pictures decoded
SCRIPT = """
(function () {
  var errors = [];
  window.onerror = function (message, source, line) {
    errors.push(String(message) + (line ? " (line " + line + ")" : ""));
    document.body.setAttribute("data-js-errors", errors.join(" | "));
    return false;
  };
  window.addEventListener("load", function () {
    var imgs = document.images, loaded = 0;
    for (var i = 0; i < imgs.length; i++) {
      if (imgs[i].complete && imgs[i].naturalWidth > 0) loaded++;
    }
    document.body.dataset.imagesLoaded = String(loaded);
    document.body.dataset.imagesTotal = String(imgs.length);
    document.body.dataset.ready = "1";
  });
})();
"""

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def _baselines_of(metrics: dict, split: str | None) -> dict | None:
    """The trivial baselines of ``split`` in metrics.json (wsss.evaluation.baselines), if scored."""
    return ((metrics.get("baselines") or {}).get("splits") or {}).get(split) if split else None


def _best_baseline(metrics: dict, split: str | None) -> tuple[str, dict] | None:
    b = _baselines_of(metrics, split)
    if not b or not b.get("best") or not isinstance(b.get(b["best"]), dict):
        return None
    return b["best"], b[b["best"]]


def _baseline_cell(metrics: dict, split: str | None, miou) -> str:
    """The headline table's cell beside a score: the best trivial baseline of its split, marked when above it."""
    best = _best_baseline(metrics, split)
    if best is None:
        return "<td></td>"
    name, scores = best
    v = scores.get("miou")
    below = miou is not None and v is not None and miou < v
    text = f"{_num(v)}{' (the score is below it)' if below else ''}"
    return (f'<td class="vs-baseline{" below" if below else ""}">{_e(text)}<br><span class="note">'
            f"{_e(LABELS.get(name, name))}</span></td>")


def _headline(metrics: dict) -> str:
    with_baselines = bool((metrics.get("baselines") or {}).get("splits"))

    def vs(split, miou) -> str:
        return _baseline_cell(metrics, split, miou) if with_baselines else ""

    rows = []
    for split, s in metrics.get("splits", {}).items():
        m = s.get("maps") or {}
        rows.append(f'<tr data-split="{_e(split)}"><td>{_e(split)}</td><td>{_num(s.get("images"))}</td>'
                    f'<td>{_num((s.get("classifier") or {}).get("mAP"))}</td><td>{_num(m.get("miou"))}</td>'
                    f'<td>{_num(m.get("class_avg_acc"))}</td><td>{_num(m.get("pixel_acc"))}</td>'
                    f'{vs(split, m.get("miou")) if m else vs(None, None)}</tr>')
    p = metrics.get("pseudo")
    if p:
        rows.append(f'<tr class="pseudo"><td>pseudo masks ({_e(p.get("split"))})</td><td></td><td></td>'
                    f'<td>{_num(p.get("miou"))}</td><td>{_num(p.get("class_avg_acc"))}</td>'
                    f'<td>{_num(p.get("pixel_acc"))}</td>{vs(p.get("split"), p.get("miou"))}</tr>')
    g = metrics.get("seg")
    if g:
        what = ", ".join(str(x) for x in (g.get("backbone"), f"trained on {g['masks']} masks" if g.get("masks") else None)
                         if x)
        rows.append(f'<tr class="seg"><td>segmentation network ({_e(g.get("split"))})'
                    f'{"<br><span class=note>" + _e(what) + "</span>" if what else ""}</td><td></td><td></td>'
                    f'<td>{_num(g.get("miou"))}</td><td>{_num(g.get("class_avg_acc"))}</td>'
                    f'<td>{_num(g.get("pixel_acc"))}</td>{vs(g.get("split"), g.get("miou"))}</tr>')
    table = ('<table class="metrics"><thead><tr><th>split</th><th>images</th><th>classifier mAP</th>'
             '<th>map mIoU</th><th>class-avg acc</th><th>pixel acc</th>'
             + ("<th>best trivial baseline (mIoU)</th>" if with_baselines else "") + "</tr></thead><tbody>"
             + "".join(rows) + "</tbody></table>")
    sel = metrics.get("selection") or {}
    if sel.get("bg_threshold") is not None:
        where = sel.get("chosen_on")
        txt = f"Background threshold <b>{_e(_num(sel['bg_threshold']))}</b>"
        if where == "config":
            txt += ", set in the config."
        elif where:
            txt += f", chosen on split <b>{_e(where)}</b>"
            if sel.get("miou_on_selection_split") is not None:
                txt += f" (mIoU {_e(_num(sel['miou_on_selection_split']))} there)"
            txt += "."
    else:
        txt = "No background threshold" + (f": {_e(sel['reason'])}." if sel.get("reason") else ".")
    notes = [f'<p class="threshold">{txt}</p>',
             '<p class="note">Scores in percent. "map" columns: the localization maps turned into masks by the '
             "pseudo-mask rule, scored against the ground truth; the pseudo-mask row scores the masks as written"
             + ("; the segmentation-network row scores its predictions alone" if g else "") + ".</p>"]
    sup = metrics.get("supervision")
    if sup:
        about = "; ".join(f"<b>{_e(k)}</b> = {_e(v)}" for k, v in sorted(sup["about"].items()))
        notes.append(f'<p class="supervision">Supervision: maps <b>{_e(sup["maps"])}</b>, pseudo masks '
                     f'<b>{_e(sup["pseudo"])}</b>, segmentation network <b>{_e(sup["seg"])}</b> ({about}).</p>')
    t = metrics.get("timing") or {}
    bits = []
    if t.get("train_seconds") is not None:
        bits.append(f"classifier training {_num(t['train_seconds'], 1)} s "
                    f"({_num(t.get('train_seconds_per_epoch'))} s/epoch)")
    for split, info in (t.get("maps") or {}).items():
        if isinstance(info, dict) and info.get("images_per_s") is not None:
            bits.append(f"maps {split}: {_num(info['images_per_s'])} images/s")
    if t.get("eval_seconds") is not None:
        bits.append(f"evaluation {_num(t['eval_seconds'], 1)} s")
    if bits:
        notes.append('<p class="note">Timing: ' + _e("; ".join(bits)) + "</p>")
    return table + "".join(notes)


def _label_check_of(metrics: dict) -> dict | None:
    for record in (metrics.get("stages") or {}).values():
        if isinstance(record, dict) and isinstance(record.get("label_check"), dict):
            return record["label_check"]
    return None


def _data_checks(metrics: dict) -> str:
    """The label check of the training split and the trivial baselines of every scored split."""
    out = []
    check = _label_check_of(metrics)
    if check:
        out.append("<h2>Label check</h2>")
        masks = f", pixel shares from {check.get('masks')} masks" if check.get("masks") else ""
        verdict = check.get("verdict")
        if check.get("message"):
            out.append(f'<p class="warn label-check" data-verdict="{_e(verdict)}">{_e(check["message"])}</p>')
        else:
            out.append(f'<p class="note label-check" data-verdict="{_e(verdict)}">Passed: no class is labelled on '
                       f"{_e(_num(100 * check.get('common_fraction', 0.9), 1))}% or more of the training images, so "
                       "image-level labels can tell where each class is by contrast.</p>")
        common = set(check.get("common") or ())
        rows = "".join(
            f'<tr data-class="{_e(n)}"{" class=common" if n in common else ""}><td>{_e(n)}</td>'
            f"<td>{_num(v.get('images'), 1)}</td><td>{_num(v.get('pixels'), 1)}</td></tr>"
            for n, v in (check.get("classes") or {}).items())
        out.append(f'<details{" open" if common else ""}><summary>per class: share of the {_e(check.get("images"))} '
                   f"training images (split {_e(check.get('split'))}) labelled with it{_e(masks)}</summary>"
                   '<table class="metrics label-check"><thead><tr><th>class</th><th>images (%)</th><th>pixels (%)</th>'
                   f"</tr></thead><tbody>{rows}</tbody></table></details>")
    b = metrics.get("baselines") or {}
    splits = b.get("splits") or {}
    if splits:
        out.append("<h2>Trivial baselines</h2>")
        names = [n for n in BASELINES if any(isinstance(v.get(n), dict) for v in splits.values())]
        head = "".join(f"<th>{_e(sp)}</th>" for sp in splits)
        rows = []
        for n in names:
            cells = "".join(
                f'<td{" class=best" if v.get("best") == n else ""}>{_num((v.get(n) or {}).get("miou"))}</td>'
                for v in splits.values())
            rows.append(f'<tr class="baseline" data-baseline="{_e(n)}"><td>{_e(LABELS.get(n, n))}</td>{cells}</tr>')
        out.append(f'<table class="metrics baselines"><thead><tr><th>baseline (mIoU)</th>{head}</tr></thead><tbody>'
                   + "".join(rows) + "</tbody></table>")
        t = b.get("training") or {}
        about = "; ".join(f"<b>{_e(LABELS.get(n, n))}</b>: {_e(DESCRIPTIONS.get(n, ''))}" for n in names)
        out.append(f'<p class="note">Predictors that never look at the pixels, scored like everything else on the same '
                   f"splits. {about}. Statistics from split {_e(t.get('split'))} ({_e(t.get('images'))} images, class "
                   f"frequency from {_e(t.get('frequency_from'))}; most frequent class: {_e(t.get('most_frequent'))}). "
                   "Bold: the best of the image-label baselines on each split, drawn as the reference line in the charts "
                   "below; a score under it learned less than a rule that ignores the image.</p>")
    return "".join(out)


def _charts(metrics: dict, spec: DatasetSpec | None, test_split: str | None) -> str:
    out = []
    series = []
    p = metrics.get("pseudo")
    if p and p.get("per_class"):
        series.append(("pseudo", f"pseudo masks ({p.get('split')})",
                       {k: v.get("iou") for k, v in p["per_class"].items()}))
    splits = metrics.get("splits", {})
    if test_split and (splits.get(test_split) or {}).get("maps", {}).get("per_class"):
        pc = splits[test_split]["maps"]["per_class"]
        series.append(("test", f"maps → masks ({test_split})", {k: v.get("iou") for k, v in pc.items()}))
    g = metrics.get("seg")
    if g and g.get("per_class"):
        series.append(("seg", f"segmentation network ({g.get('split')})",
                       {k: v.get("iou") for k, v in g["per_class"].items()}))
    out.append("<h2>Per-class IoU</h2>")
    if series:
        classes = list(spec.classes) if spec else list(dict.fromkeys(k for _, _, v in series for k in v))
        series_split = {"pseudo": (p or {}).get("split"), "test": test_split, "seg": (g or {}).get("split")}
        refs = {}
        for key, _label, _values in series:
            best = _best_baseline(metrics, series_split.get(key))
            if best:
                refs[key] = {k: v.get("iou") for k, v in (best[1].get("per_class") or {}).items()}
        out.append(bar_chart_svg(classes, series, refs, "best trivial baseline of the bar's split"))
        if refs:
            out.append('<p class="note">Dark tick on each bar: the IoU of that class under the best trivial baseline '
                       "of the bar's split.</p>")
    else:
        out.append('<p class="note">No per-class scores (no ground truth for the scored splits).</p>')
    sweeps = {s: v["sweep"] for s, v in splits.items() if v.get("sweep")}
    out.append("<h2>Threshold sweep</h2>")
    if sweeps:
        sel = metrics.get("selection") or {}
        has_bg = (spec.background is not None) if spec else sel.get("bg_threshold") is not None
        coverage = not has_bg
        label = "background threshold" if has_bg else "confidence threshold (pixels below it are ignored)"
        refs = {sp: best[1].get("miou") for sp in sweeps if (best := _best_baseline(metrics, sp))}
        out.append(sweep_chart_svg(sweeps, coverage=coverage, chosen=sel.get("bg_threshold"), x_label=label,
                                   references=refs, reference_label="best trivial baseline"))
        if coverage:
            out.append('<p class="note">Solid: mIoU; dashed: coverage, the share of labelled pixels that keep a '
                       "label at that threshold.</p>")
    else:
        out.append('<p class="note">No sweep (no ground truth for the scored splits).</p>')
    out.append(_self_training(metrics))
    return "".join(out)


def _self_training(metrics: dict) -> str:
    """The self-training rounds as a curve (mIoU of each round's training masks and of its network per split) and a
    table of the confidence rule per round."""
    rounds = (metrics.get("self_training") or {}).get("rounds")
    if not rounds:
        return ""
    curves: dict[str, list[dict]] = {}
    for r in rounds:
        if r["masks"].get("train_miou") is not None:
            curves.setdefault("training masks", []).append({"threshold": r["round"], "miou": r["masks"]["train_miou"]})
        for split, sc in (r.get("network") or {}).items():
            curves.setdefault(f"network on {split}", []).append({"threshold": r["round"], "miou": sc["miou"]})
    ks = [r["round"] for r in rounds]
    out = ["<h2>Self-training rounds</h2>"]
    if curves:
        out.append(sweep_chart_svg(curves, coverage=False, x_label="round", x_ticks=ks))
    head = ("<tr><th>round</th><th>masks</th><th>confidence rule (chosen on)</th><th>pixels kept</th>"
            "<th>masks mIoU (train)</th>" + "".join(f"<th>network {_e(s)}</th>" for s in
                                                     dict.fromkeys(s for r in rounds for s in (r.get("network") or {})))
            + "</tr>")
    splits = list(dict.fromkeys(s for r in rounds for s in (r.get("network") or {})))
    rows = []
    for r in rounds:
        m = r["masks"]
        rule = "–" if r["round"] == 1 else f"{_e(m.get('rule'))} {_e(m.get('rule_value'))} ({_e(m.get('chosen_on'))})"
        kept = "–" if m.get("kept_fraction") is None else f"{100 * m['kept_fraction']:.1f}%"
        nets = "".join(f"<td>{_num(((r.get('network') or {}).get(s) or {}).get('miou'))}</td>" for s in splits)
        rows.append(f"<tr><td>{r['round']}</td><td>{_e(m.get('source'))}</td><td>{rule}</td><td>{kept}</td>"
                    f"<td>{_num(m.get('train_miou'))}</td>{nets}</tr>")
    out.append(f"<table>{head}{''.join(rows)}</table>")
    out.append('<p class="note">Masks mIoU counts the pixels each round kept (ignored ones are left out). Each network '
               "is scored alone (no image labels) with the run's inference settings.</p>")
    return "".join(out)


def _legend(spec: DatasetSpec) -> str:
    items = [f'<span><span class="swatch" style="background: rgb{tuple(spec.palette[i])}"></span>{_e(name)}</span>'
             for i, name in enumerate(spec.classes)]
    items.append('<span><span class="swatch" style="background: #fff"></span>ignore</span>')
    items.append(f'<span>map 0<span class="jet" style="background: {_jet_gradient_css()}"></span>1</span>')
    return '<div class="legendbar">' + "".join(items) + "</div>"


def _figure(t: Tile) -> str:
    w, h = t.size
    if t.uri is not None:
        cls = ' class="mask"' if t.mask else ""
        body = f'<img{cls} src="{t.uri}" width="{w}" height="{h}" alt="{_e(t.caption)}">'
    else:
        box_w = round(TILE_HEIGHT * w / max(h, 1))
        body = f'<div class="placeholder" style="width: {box_w}px">{_e(t.note or "")}</div>'
    return f"<figure>{body}<figcaption>{_e(t.caption)}</figcaption></figure>"


def _images(groups: Sequence[ImageGroup], spec: DatasetSpec | None, note: str | None) -> str:
    out = ["<h2>Images</h2>"]
    if note:
        out.append(f'<p class="warn">{_e(note)}</p>')
    if spec is not None and groups:
        out.append(_legend(spec))
    for g in groups:
        out.append(f'<section class="group" data-split="{_e(g.split)}"><h3>{_e(g.title)}: first {len(g.rows)} of '
                   f"{g.total}</h3>")
        if g.note:
            out.append(f'<p class="warn">{_e(g.note)}</p>')
        for r in g.rows:
            labels = ", ".join(r.labels) or "none"
            out.append(f'<div class="row" data-id="{_e(r.id)}"><div class="head"><b>{_e(r.id)}</b> '
                       f'<span class="note">labels: {_e(labels)}</span></div>')
            if r.error:
                out.append(f'<p class="warn">{_e(r.error)}</p>')
            out.append('<div class="tiles">' + "".join(_figure(t) for t in r.tiles) + "</div></div>")
        out.append("</section>")
    return "".join(out)


def render_report(metrics: dict, spec: DatasetSpec | None = None, groups: Sequence[ImageGroup] = (),
                  test_split: str | None = "test", config_text: str = "", note: str | None = None) -> str:
    """The page as a string (pure: everything it shows is passed in)."""
    run = metrics.get("run", "run")
    parts = [metrics.get("method"), metrics.get("backbone"), metrics.get("localizer")]
    what = " / ".join(str(p) for p in parts if p)
    title = f"{run} — {what} on {metrics.get('dataset', '?')}"
    sub = [f"seed {metrics['seed']}" if metrics.get("seed") is not None else None,
           f"image labels: {metrics['image_labels']}" if metrics.get("image_labels") else None]
    keys = metrics.get("stage_keys") or {}
    if keys:
        sub.append("stage keys: " + ", ".join(f"{k} {v}" for k, v in keys.items()))
    body = [
        f'<h1>{_e(run)} <span class="what">— {_e(what)} on {_e(metrics.get("dataset", "?"))}</span></h1>',
        f'<p class="sub">{_e(" · ".join(s for s in sub if s))}</p>',
        "<h2>Headline numbers</h2>",
        _headline(metrics),
        _data_checks(metrics),
        _charts(metrics, spec, test_split),
        _images(groups, spec, note),
    ]
    if config_text:
        body.append(f"<h2>Config</h2><details><summary>resolved config.yaml</summary><pre>{_e(config_text)}</pre>"
                    "</details>")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head>\n"
        f'<body data-ready="0" data-js-errors=""><script>{SCRIPT}</script>\n'
        + "\n".join(body)
        + "\n</body></html>\n"
    )


# -- reading a run directory ------------------------------------------------------------------------------------------
def _read_index_png(path: Path) -> np.ndarray | Image.Image:
    """A palette / grey PNG as class indices; anything else as an RGB picture."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("P", "L"):
                return np.asarray(img, np.uint8).copy()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: cannot decode: {e}") from None


def _mask_tile(caption: str, source, spec: DatasetSpec, size: tuple[int, int]) -> Tile:
    if isinstance(source, Image.Image):
        return Tile(caption, _data_uri(source.resize(size, Image.NEAREST), "PNG"), size=size, mask=True)
    return Tile(caption, _mask_uri(source, spec, size), size=size, mask=True)


def _image_row(s, split: str, reader, layout: RunLayout, bg_threshold, pseudo_split: str) -> ImageRow:
    from wsss.data.io import load_image
    from wsss.localize import load_maps
    from wsss.pseudo import pseudo_mask

    spec = reader.spec
    row = ImageRow(s.id, [spec.classes[c] for c in (s.labels or ()) if 0 <= c < spec.num_classes])
    try:
        photo = load_image(s.image)
        maps = load_maps(layout.map_file(split, s.id))
    except DataError as e:
        row.error = str(e)
        return row
    h, w = photo.shape[:2]
    size = _fit(w, h)
    small = photo if size == (w, h) else np.asarray(Image.fromarray(photo).resize(size, Image.BILINEAR))
    row.tiles.append(Tile("photo", _data_uri(Image.fromarray(small), "JPEG"), size=size))
    for k, c in enumerate(maps["classes"].tolist()):
        name = spec.classes[c] if 0 <= c < spec.num_classes else f"class {c}"
        caption = f"CAM: {name}"
        if c in spec.fg_ids and maps["scores"].shape[0] == spec.num_fg:
            p = 1 / (1 + math.exp(-float(maps["scores"][spec.fg_ids.index(c)])))
            caption += f" (p {p:.2f})"
        heat = overlay(small, _resize_map(maps["maps"][k], size))
        row.tiles.append(Tile(caption, _data_uri(Image.fromarray(heat), "JPEG"), size=size))
    # pseudo mask as written; for other splits the maps turned into a mask by the same rule as in evaluation
    png = layout.pseudo_mask(split, s.id)
    try:
        if split == pseudo_split and png.is_file():
            row.tiles.append(_mask_tile("pseudo mask", _read_index_png(png), spec, size))
        elif spec.background is not None and bg_threshold is None:
            row.tiles.append(Tile("mask from maps", note="no background threshold chosen yet", size=size))
        else:
            mask = pseudo_mask(maps["maps"], maps["classes"], spec, bg_threshold)
            row.tiles.append(_mask_tile("mask from maps", mask, spec, size))
    except DataError as e:
        row.tiles.append(Tile("pseudo mask", note=str(e), size=size))
    pred = layout.prediction(split, s.id)
    if not pred.parent.is_dir():
        row.tiles.append(Tile("prediction", note="no prediction yet", size=size))
    elif not pred.is_file():
        row.tiles.append(Tile("prediction", note="no prediction for this image", size=size))
    else:
        try:
            row.tiles.append(_mask_tile("prediction", _read_index_png(pred), spec, size))
        except DataError as e:
            row.tiles.append(Tile("prediction", note=str(e), size=size))
    if s.mask is None:
        row.tiles.append(Tile("ground truth", note="no ground truth", size=size))
    else:
        try:
            row.tiles.append(_mask_tile("ground truth", reader.load_mask(s, (h, w)), spec, size))
        except DataError as e:
            row.tiles.append(Tile("ground truth", note=str(e), size=size))
    return row


def _split_name(cfg, role: str) -> str:
    from wsss.config.schema import split_name

    return split_name(cfg, role)


def _collect(layout: RunLayout, cfg, metrics: dict, n_images: int):
    """(spec, image groups, note) for the page; the dataset is only read here."""
    from wsss.data.readers import open_dataset

    try:
        reader = open_dataset(cfg.data)
    except WsssError as e:
        return None, [], f"Images not shown: the dataset could not be opened ({e})"
    pseudo_split = (metrics.get("pseudo") or {}).get("split")
    if pseudo_split is None:
        try:
            pseudo_split = json.loads(layout.stage_record(PSEUDO).read_text()).get("split")
        except (OSError, ValueError):
            pass
    pseudo_split = pseudo_split or _split_name(cfg, cfg.pseudo.split)
    splits = [(pseudo_split, f"{pseudo_split} (pseudo-mask split)")]
    test = cfg.data.test_split
    if test and test != pseudo_split and layout.split(MAPS, test).is_dir():
        splits.append((test, f"{test} (test split)"))
    bg = (metrics.get("selection") or {}).get("bg_threshold")
    groups = []
    for split, title in splits:
        maps_dir = layout.split(MAPS, split)
        group = ImageGroup(split, title, 0)
        groups.append(group)
        if not maps_dir.is_dir():
            group.note = f"no maps for split '{split}' in {maps_dir}"
            continue
        try:
            samples = [s for s in reader.samples(split) if (maps_dir / f"{s.id}.npz").is_file()]
        except WsssError as e:
            group.note = str(e)
            continue
        group.total = len(samples)
        group.rows = [_image_row(s, split, reader, layout, bg, pseudo_split) for s in samples[: max(0, n_images)]]
    return reader.spec, groups, None


def write_report(run_dir: Path, n_images: int = 12) -> Path:
    """Write ``<run_dir>/report/index.html`` (see the module docstring) and return its path."""
    from wsss.config import load_config

    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    metrics_path = layout.metrics
    if not metrics_path.is_file():
        raise DataError(f"{metrics_path} does not exist: run `wsss run CONFIG` (or `wsss eval CONFIG`) for this run "
                        "first")
    try:
        metrics = json.loads(metrics_path.read_text())
    except ValueError as e:
        raise DataError(f"{metrics_path}: not valid JSON ({e}); rerun `wsss eval`") from None
    config_path = layout.config
    if not config_path.is_file():
        raise DataError(f"{config_path} does not exist; is {run_dir} a run directory (runs/<name>)?")
    cfg = load_config(config_path)
    spec, groups, note = _collect(layout, cfg, metrics, n_images)
    page = render_report(metrics, spec, groups, test_split=cfg.data.test_split, config_text=config_path.read_text(),
                         note=note)
    out = layout.report
    atomic_write_text(out, page)
    out.chmod(0o644)  # a page to share: readable like any other file, not private like the temporary file was
    log.info("report: %s", out)
    return out
