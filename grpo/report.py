"""The run report: ``<run_dir>/report.html``, one self-contained page that shows whether RL worked.

It reads what a GRPO run leaves in its directory -- ``metrics.jsonl`` (`grpo.tracking`), the
held-out evaluations ``eval/step_*/`` (`grpo.evaluation`) and ``resolved_recipe.yaml`` -- and draws:

* headline numbers: each reward on the held-out set before RL (the first evaluation) and after
  (the last), the change, and the success rate (share of samples scoring >= a threshold, for
  rewards whose scores lie in [0, 1]);
* the before / after table of the same numbers;
* curves over iterations: every reward's training batch mean (raw and smoothed) with the held-out
  mean, then KL to the reference, clip fraction, approximate KL, loss and gradient norm;
* side-by-side animated GIFs of held-out rows: context | true next scene | before RL | after RL
  (the panels a row has: text-prompt rows show only before and after);
* the resolved recipe and links to the raw files.

Everything is inline (SVG plots drawn here, GIFs as base64 data URIs), so the file opens offline,
can be mailed, and renders the same in any browser. `nextscene train` writes it at the end of a
GRPO run; ``nextscene report RUN_DIR`` rebuilds it.
"""

from __future__ import annotations

import base64
import datetime
import html
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from grpo.evaluation import EvalResults, RewardSummary, eval_steps
from grpo.tracking import METRICS_FILE, read_metrics
from policies.errors import InputError
from policies.video_io import read_video, resize_frame, side_by_side, to_uint8, write_video

REPORT_FILE = "report.html"
REPORT_VIDEOS_DIR = "report_videos"
DEFAULT_THRESHOLD = 0.5
# training curves after the rewards: metric key -> (title, what it means)
TRAINING_CURVES = {
    "train/kl": ("KL to the reference", "mean per-step KL(policy || reference); grows as the policy moves"),
    "train/clip_frac": ("clip fraction", "share of ratios outside [1 - epsilon, 1 + epsilon]"),
    "train/approx_kl": ("approximate KL (old -> new)", "how far each update moved the sampling policy"),
    "train/loss": ("loss", "clipped surrogate + beta KL"),
    "train/grad_norm": ("gradient norm", "before clipping"),
}
TRAIN_COLOUR, SMOOTH_COLOUR, EVAL_COLOUR, OTHER_COLOUR = "#93c5fd", "#1d4ed8", "#ea580c", "#7c3aed"


# ------------------------------------------------------------------------------------------ numbers


@dataclass
class Comparison:
    """One reward before and after RL on the held-out set (``after`` is None with one evaluation)."""

    name: str
    weight: float
    before: RewardSummary
    after: RewardSummary | None

    @property
    def delta(self) -> float | None:
        return None if self.after is None else self.after.mean - self.before.mean

    @property
    def success_comparable(self) -> bool:
        """Success rates are shown only when both evaluations' scores lie in [0, 1]."""
        return self.before.success_rate is not None and (
            self.after is None or self.after.success_rate is not None
        )


def compare(
    before: EvalResults, after: EvalResults | None, threshold: float = DEFAULT_THRESHOLD
) -> list[Comparison]:
    """Per reward, the held-out summaries of two evaluations; the highest-weighted reward first."""
    first = before.summary(threshold)
    last = after.summary(threshold) if after is not None else {}
    names = sorted(before.reward_names, key=lambda n: -before.reward_weights.get(n, 0.0))
    return [Comparison(n, before.reward_weights.get(n, 0.0), first[n], last.get(n)) for n in names]


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def format_table(comparisons: Sequence[Comparison], threshold: float = DEFAULT_THRESHOLD) -> str:
    """The before / after table as plain text (the same numbers as the report's table)."""
    two = any(c.after is not None for c in comparisons)
    header = ["reward", "weight", "before" if two else "mean", "std"]
    header += ["after", "std", "delta"] if two else []
    header += [f"success>={threshold:g}"] + (["success after"] if two else []) + ["scored"]
    lines = [header]
    for c in comparisons:
        cells = [c.name, f"{c.weight:g}", _fmt(c.before.mean), _fmt(c.before.std)]
        if two:
            cells += [_fmt(c.after.mean), _fmt(c.after.std), _signed(c.delta)]
        cells.append(_pct(c.before.success_rate) if c.success_comparable else "n/a")
        if two:
            cells.append(_pct(c.after.success_rate) if c.success_comparable else "n/a")
        cells.append(f"{c.before.scored}/{c.before.total}")
        lines.append(cells)
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in lines)


def _signed(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return ("+" if value >= 0 else "-") + _fmt(abs(value))


# ------------------------------------------------------------------------------------------ SVG plots


@dataclass
class Series:
    """One line of a chart: points ``(x[i], y[i])``; NaN breaks the line."""

    label: str
    x: list[float]
    y: list[float]
    colour: str
    width: float = 2.0
    markers: bool = False


def nice_ticks(low: float, high: float, count: int = 5, integer: bool = False) -> list[float]:
    """About ``count`` round tick values (1, 2, 2.5, 5 x 10^k steps) covering ``[low, high]``;
    ``integer`` keeps steps >= 1 and whole (iterations)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0, 1.0]
    if high - low < 1e-12 * max(1.0, abs(high)):  # a constant: centre it
        pad = abs(high) * 0.1 or 0.5
        low, high = (max(0.0, low - pad) if low >= 0 else low - pad), high + pad
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if raw <= m * magnitude * (1 + 1e-9))
    if integer:
        step = max(1.0, math.ceil(step))
    start = math.floor(low / step + 1e-9) * step
    ticks = []
    k = 0
    while start + (k - 1) * step < high - 1e-9 * step:
        ticks.append(start + k * step)
        k += 1
    return ticks


def _tick_label(value: float, step: float) -> str:
    """``value`` with just enough decimals to tell ticks ``step`` apart."""
    if value == 0:
        return "0"
    if step < 1e-3 or abs(value) >= 1e5:
        return f"{value:.1e}"
    exponent = math.floor(math.log10(step) + 1e-9)
    mantissa = step / 10**exponent
    decimals = max(0, -exponent + (1 if abs(mantissa - 2.5) < 1e-6 else 0))
    return f"{value:.{decimals}f}"


def svg_chart(
    series: Sequence[Series],
    *,
    title: str,
    subtitle: str = "",
    x_label: str = "iteration",
    width: int = 560,
    height: int = 300,
) -> str:
    """A line chart as inline SVG: axes with round ticks, grid, legend; markers carry value tooltips."""
    left, right, top, bottom = 64, 16, 68 if subtitle else 50, 42
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = [x for s in series for x, y in zip(s.x, s.y, strict=True) if math.isfinite(y)]
    ys = [y for s in series for y in s.y if math.isfinite(y)]
    parts = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">',
        f'<text x="{left}" y="20" class="chart-title">{html.escape(title)}</text>',
    ]
    if subtitle:
        parts.append(f'<text x="{left}" y="38" class="chart-subtitle">{html.escape(subtitle)}</text>')
    if not ys:
        parts.append(
            f'<text x="{left + plot_w / 2}" y="{top + plot_h / 2}" class="empty">no data</text></svg>'
        )
        return "".join(parts)
    whole = all(float(x).is_integer() for x in xs)
    xticks = nice_ticks(min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1, 6, integer=whole)
    yticks = nice_ticks(min(ys), max(ys), 5)
    x0, x1, y0, y1 = xticks[0], xticks[-1], yticks[0], yticks[-1]

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top + plot_h - (y - y0) / (y1 - y0) * plot_h

    xstep = xticks[1] - xticks[0] if len(xticks) > 1 else 1.0
    ystep = yticks[1] - yticks[0] if len(yticks) > 1 else 1.0
    for t in yticks:
        parts.append(
            f'<line class="grid" x1="{left}" x2="{left + plot_w}" y1="{py(t):.1f}" y2="{py(t):.1f}"/>'
        )
        parts.append(
            f'<text class="tick" x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">'
            f"{_tick_label(t, ystep)}</text>"
        )
    for t in xticks:
        parts.append(
            f'<text class="tick" x="{px(t):.1f}" y="{top + plot_h + 16}" text-anchor="middle">'
            f"{_tick_label(t, xstep)}</text>"
        )
    parts.append(f'<rect class="frame" x="{left}" y="{top}" width="{plot_w}" height="{plot_h}"/>')
    parts.append(
        f'<text class="axis-label" x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle">'
        f"{html.escape(x_label)}</text>"
    )
    for s in series:
        points = [(x, y) for x, y in zip(s.x, s.y, strict=True) if math.isfinite(y)]
        parts.append(f'<g class="series" data-label="{html.escape(s.label)}" data-points="{len(points)}">')
        run: list[str] = []
        for x, y in [*zip(s.x, s.y, strict=True), (math.nan, math.nan)]:
            if math.isfinite(y):
                run.append(f"{px(x):.1f},{py(y):.1f}")
                continue
            if len(run) > 1:
                parts.append(
                    f'<polyline fill="none" stroke="{s.colour}" stroke-width="{s.width}" '
                    f'stroke-linejoin="round" points="{" ".join(run)}"/>'
                )
            run = []
        if s.markers or len(points) == 1:
            for x, y in points:
                parts.append(
                    f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="4" fill="{s.colour}">'
                    f"<title>{html.escape(s.label)} at {x:g}: {_fmt(y)}</title></circle>"
                )
        parts.append("</g>")
    legend_x, y = left, top - 9  # legend: left to right above the plot, under the subtitle
    for s in series:
        parts.append(
            f'<line x1="{legend_x}" x2="{legend_x + 16}" y1="{y - 4}" y2="{y - 4}" '
            f'stroke="{s.colour}" stroke-width="3"/>'
        )
        parts.append(
            f'<text class="legend" x="{legend_x + 21}" y="{y}" fill="#334155">{html.escape(s.label)}</text>'
        )
        legend_x += 21 + round(6.5 * len(s.label)) + 18
    parts.append("</svg>")
    return "".join(parts)


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Centred running mean over ``window`` points (NaNs skipped), for noisy per-batch rewards."""
    half = window // 2
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - half) : i + half + 1] if math.isfinite(v)]
        out.append(sum(chunk) / len(chunk) if chunk else math.nan)
    return out


def _column(metrics: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    rows = [m for m in metrics if isinstance(m.get(key), int | float)]
    return [float(m["step"]) for m in rows], [float(m[key]) for m in rows]


def reward_names(metrics: Sequence[dict[str, Any]], evaluations: Sequence[EvalResults]) -> list[str]:
    """Reward names in the run: from the evaluations, else from ``reward/<name>/mean`` keys."""
    if evaluations:
        return list(evaluations[0].reward_names)
    names: list[str] = []
    for m in metrics:
        for key in m:
            if key.startswith("reward/") and key.endswith("/mean") and key.count("/") >= 2:
                name = key[len("reward/") : -len("/mean")]
                if name not in names:
                    names.append(name)
    return names


def reward_charts(metrics: Sequence[dict[str, Any]], names: Sequence[str]) -> list[str]:
    """One chart per reward: training batch mean (raw, smoothed) and held-out mean over iterations."""
    charts = []
    for name in names:
        series = []
        x, y = _column(metrics, f"reward/{name}/mean")
        if x:
            series.append(Series("train batch mean", x, y, TRAIN_COLOUR, width=1.2))
            window = max(3, len(x) // 12)
            if len(x) >= 2 * window:
                series.append(Series(f"train, smoothed ({window} it.)", x, smooth(y, window), SMOOTH_COLOUR))
        x, y = _column(metrics, f"eval/{name}/mean")
        if x:
            series.append(Series("held-out mean", x, y, EVAL_COLOUR, width=2.5, markers=True))
        charts.append(svg_chart(series, title=f"reward: {name}", subtitle="higher is better"))
    return charts


def training_charts(metrics: Sequence[dict[str, Any]]) -> list[str]:
    """KL, clip fraction and the other optimisation curves that were logged."""
    charts = []
    for key, (title, meaning) in TRAINING_CURVES.items():
        x, y = _column(metrics, key)
        if x:
            charts.append(svg_chart([Series(key, x, y, OTHER_COLOUR)], title=title, subtitle=meaning))
    return charts


# ------------------------------------------------------------------------------------------ videos


def _fit(video: np.ndarray, size: int = 160, max_frames: int = 48) -> tuple[np.ndarray, int]:
    """uint8 frames resized so the longer side is about ``size`` (small videos: integer nearest
    upscaling, so pixels stay sharp), at most ``max_frames`` frames; returns the frame stride too."""
    stride = max(1, math.ceil(len(video) / max_frames))
    video = video[::stride]
    longest = max(video.shape[1:3])
    if longest <= size:
        k = max(1, size // longest)
        return video.repeat(k, axis=1).repeat(k, axis=2), stride
    h, w = (round(d * size / longest) for d in video.shape[1:3])
    return np.stack([resize_frame(f, h, w, "stretch") for f in video]), stride


PANELS = (("context", "context"), ("true", "true next scene"))
LABEL_FONT_SIZE = 15


def _label_band(widths: Sequence[int], labels: Sequence[str], pad: int) -> np.ndarray:
    """A white band with each label centred over its panel (``side_by_side``'s layout), uint8 [h, W, 3]."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=LABEL_FONT_SIZE)
    height = LABEL_FONT_SIZE + 2 * pad + 4
    band = Image.new("RGB", (sum(widths) + pad * (len(widths) + 1), height), (255, 255, 255))
    draw = ImageDraw.Draw(band)
    left = pad
    for width, label in zip(widths, labels, strict=True):
        draw.text((left + width / 2, height / 2 + 1), label, fill=(15, 23, 42), font=font, anchor="mm")
        left += width + pad
    return np.asarray(band)


def sample_gif(
    folder_before: Path, folder_after: Path | None, before: dict[str, str], after: dict[str, str] | None
) -> tuple[bytes, list[str], tuple[int, int]]:
    """GIF bytes of one held-out row (context | true next scene | before RL | after RL, the panels
    the row has, with a label band), the panel labels and the GIF's (height, width)."""
    import tempfile

    videos, labels = [], []
    for key, label in PANELS:
        source, folder = (
            (after, folder_after) if after is not None and key in after else (before, folder_before)
        )
        if key in source:
            videos.append(read_video(folder / source[key])[0])
            labels.append(label)
    generated, fps = read_video(folder_before / before["generated"])
    videos.append(generated)
    labels.append("before RL" if after is not None else "generated")
    if after is not None:
        videos.append(read_video(folder_after / after["generated"])[0])
        labels.append("after RL")
    fitted = [_fit(to_uint8(v)) for v in videos]
    stride = max(s for _, s in fitted)
    pad = 4
    strip = side_by_side([v for v, _ in fitted], scale=1, pad=pad)
    band = _label_band([v.shape[2] for v, _ in fitted], labels, pad)
    strip = np.concatenate([np.broadcast_to(band, (len(strip), *band.shape)), strip], axis=1)
    with tempfile.TemporaryDirectory() as tmp:
        gif = write_video(Path(tmp) / "strip.gif", strip, fps / stride).read_bytes()
    return gif, labels, strip.shape[1:3]


# ------------------------------------------------------------------------------------------ HTML

CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;margin:0;
 background:#f8fafc;color:#0f172a;line-height:1.45}
main{max-width:1200px;margin:0 auto;padding:24px 32px 48px}
h1{font-size:28px;margin:0 0 4px} h2{font-size:20px;margin:36px 0 10px;border-bottom:1px solid #e2e8f0;
 padding-bottom:6px} .sub{color:#475569;margin:0 0 18px}
.cards{display:flex;flex-wrap:wrap;gap:16px}
.card{background:#fff;border:1px solid #e2e8f0;border-radius:10px;padding:16px 20px;min-width:300px;
 box-shadow:0 1px 2px rgba(0,0,0,.04)}
.card .label{font-size:14px;color:#475569} .card .big{font-size:34px;font-weight:650;margin:4px 0}
.card .arrow{color:#94a3b8;font-weight:400;margin:0 6px}
.up{color:#15803d} .down{color:#b91c1c} .flat{color:#475569}
.card .delta{font-size:18px;font-weight:600} .card .small{font-size:14px;color:#334155;margin-top:6px}
table{border-collapse:collapse;background:#fff;font-variant-numeric:tabular-nums}
th,td{border:1px solid #e2e8f0;padding:6px 12px;text-align:right} th{background:#f1f5f9}
td:first-child,th:first-child{text-align:left}
.charts{display:flex;flex-wrap:wrap;gap:16px}
.chart{background:#fff;border:1px solid #e2e8f0;border-radius:8px}
.chart-title{font-size:15px;font-weight:600;fill:#0f172a} .chart-subtitle{font-size:12px;fill:#64748b}
.tick{font-size:11px;fill:#475569} .axis-label{font-size:12px;fill:#475569} .legend{font-size:12px}
.grid{stroke:#e2e8f0} .frame{fill:none;stroke:#cbd5e1} .empty{font-size:14px;fill:#94a3b8}
.sample{background:#fff;border:1px solid #e2e8f0;border-radius:8px;padding:12px;margin:0 0 16px;
 display:inline-block;vertical-align:top;margin-right:16px}
.sample img{image-rendering:pixelated;display:block} .sample .caption{font-size:14px;color:#334155;
 margin-top:8px} summary{cursor:pointer;color:#1d4ed8}
pre{background:#0f172a;color:#e2e8f0;padding:14px;border-radius:8px;overflow:auto;font-size:12px}
.note{color:#475569;font-size:14px} a{color:#1d4ed8}
"""


def _delta_class(delta: float | None) -> str:
    if delta is None or math.isnan(delta) or abs(delta) < 1e-12:
        return "flat"
    return "up" if delta > 0 else "down"


def _cards(comparisons: Sequence[Comparison], threshold: float) -> str:
    cards = []
    for c in comparisons:
        role = f"trained on, weight {c.weight:g}" if c.weight else "monitored only, weight 0"
        if c.after is None:
            big = _fmt(c.before.mean)
            delta = ""
        else:
            big = f'{_fmt(c.before.mean)}<span class="arrow">&rarr;</span>{_fmt(c.after.mean)}'
            rel = (
                f" ({100 * c.delta / abs(c.before.mean):+.0f}%)"
                if c.before.mean and math.isfinite(c.before.mean) and abs(c.before.mean) > 1e-9
                else ""
            )
            delta = f'<div class="delta {_delta_class(c.delta)}">{_signed(c.delta)}{rel}</div>'
        success = ""
        if c.success_comparable:
            rates = _pct(c.before.success_rate)
            if c.after is not None:
                rates += f" &rarr; {_pct(c.after.success_rate)}"
            success = f'<div class="small">success rate (score &ge; {threshold:g}): <b>{rates}</b></div>'
        cards.append(
            f'<div class="card" data-reward="{html.escape(c.name)}"><div class="label">held-out '
            f"<b>{html.escape(c.name)}</b> &middot; {role}</div>"
            f'<div class="big">{big}</div>{delta}{success}</div>'
        )
    return f'<div class="cards">{"".join(cards)}</div>'


def _table(comparisons: Sequence[Comparison], threshold: float) -> str:
    two = any(c.after is not None for c in comparisons)
    head = ["reward", "weight", "before RL: mean" if two else "mean", "std"]
    if two:
        head += ["after RL: mean", "std", "change"]
    head += [f"success (&ge; {threshold:g})" + (" before" if two else "")]
    head += ["success after"] if two else []
    head += ["samples scored"]

    def cell(value: float | None, text: str, key: str, css: str = "") -> str:
        number = "" if value is None else f' data-value="{value!r}"'
        return f'<td data-key="{key}"{number}{css}>{text}</td>'

    rows = []
    for c in comparisons:
        cells = [f"<td>{html.escape(c.name)}</td>", f"<td>{c.weight:g}</td>"]
        cells.append(cell(c.before.mean, _fmt(c.before.mean), "before_mean"))
        cells.append(cell(c.before.std, _fmt(c.before.std), "before_std"))
        if two:
            cells.append(cell(c.after.mean, f"<b>{_fmt(c.after.mean)}</b>", "after_mean"))
            cells.append(cell(c.after.std, _fmt(c.after.std), "after_std"))
            cells.append(cell(c.delta, _signed(c.delta), "delta", f' class="{_delta_class(c.delta)}"'))
        comparable = c.success_comparable
        cells.append(
            cell(
                c.before.success_rate if comparable else None,
                _pct(c.before.success_rate) if comparable else "n/a",
                "before_success",
            )
        )
        if two:
            cells.append(
                cell(
                    c.after.success_rate if comparable else None,
                    _pct(c.after.success_rate) if comparable else "n/a",
                    "after_success",
                )
            )
        cells.append(f"<td>{c.before.scored}/{c.before.total}</td>")
        rows.append(f'<tr data-reward="{html.escape(c.name)}">{"".join(cells)}</tr>')
    header = "".join(f"<th>{h}</th>" for h in head)
    return f'<table class="before-after"><tr>{header}</tr>{"".join(rows)}</table>'


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _run_facts(recipe: dict[str, Any], metrics: Sequence[dict[str, Any]]) -> str:
    trainer = recipe.get("trainer", {}) if isinstance(recipe, dict) else {}
    policy = recipe.get("policy", {}) if isinstance(recipe, dict) else {}
    data = recipe.get("data", {}) if isinstance(recipe, dict) else {}
    facts = []
    if policy:
        where = policy.get("path") or ("tiny random" if policy.get("tiny") else "")
        facts.append(f"policy {policy.get('type', '?')} {where}".strip())
    if data:
        facts.append(f"data {data.get('type', '?')}")
    steps = [m["step"] for m in metrics if "train/loss" in m or "reward/mean" in m]
    if steps:
        facts.append(f"{max(steps) + 1} iterations")
    for key, label in (
        ("num_prompts_per_iteration", "prompts/iteration"),
        ("num_generations", "generations/prompt"),
        ("learning_rate", "lr"),
        ("beta", "beta"),
    ):
        if key in trainer:
            facts.append(
                f"{label} {trainer[key]:g}" if isinstance(trainer[key], float) else f"{label} {trainer[key]}"
            )
    seconds = sum(
        m.get("time/iteration_s", 0.0) for m in metrics if isinstance(m.get("time/iteration_s"), float)
    )
    if seconds:
        facts.append(f"{seconds / 60:.1f} min of training")
    return " &middot; ".join(html.escape(f) for f in facts)


def build_report(
    run_dir: str | os.PathLike[str], *, threshold: float = DEFAULT_THRESHOLD, num_videos: int = 4
) -> str:
    """The report page of a run directory as an HTML string (see the module docstring)."""
    import yaml

    run_dir = Path(run_dir)
    if not (run_dir / METRICS_FILE).is_file():
        raise InputError(f"{run_dir}: no {METRICS_FILE}; give the output_dir of a training run")
    metrics = read_metrics(run_dir)
    folders = eval_steps(run_dir)
    evaluations = [EvalResults.load(f) for f in folders]
    recipe_path = run_dir / "resolved_recipe.yaml"
    recipe_text = recipe_path.read_text() if recipe_path.is_file() else ""
    recipe = yaml.safe_load(recipe_text) if recipe_text else {}
    name = recipe.get("name") if isinstance(recipe, dict) and recipe.get("name") else run_dir.resolve().name

    out = [f"<h1>{html.escape(str(name))}: run report</h1>"]
    out.append(f'<p class="sub">{_run_facts(recipe, metrics)}</p>')

    comparisons: list[Comparison] = []
    if evaluations:
        before, after = evaluations[0], evaluations[-1] if len(evaluations) > 1 else None
        comparisons = compare(before, after, threshold)
        out.append(_cards(comparisons, threshold))
        rows, gens = len(before.rows), before.num_generations
        when = f"iteration {before.step}" + (" (before any update)" if before.step == 0 else "")
        if after is not None:
            when = f"<b>before RL</b> = {when}; <b>after RL</b> = iteration {after.step}"
        out.append(
            f'<p class="note">Held-out set: {rows} rows &times; {gens} generations, deterministic (ODE) '
            f"sampling with the same noise at every evaluation. {when}.</p>"
        )
        out.append("<h2>Before vs after RL on the held-out set</h2>")
        out.append(_table(comparisons, threshold))
        out.append(
            f'<p class="note">mean and std over every scored sample; success = share of samples '
            f"scoring &ge; {threshold:g}, shown for rewards whose scores all lie in [0, 1]; change = "
            f"after &minus; before.</p>"
        )
    else:
        out.append(
            '<p class="note"><b>No held-out evaluation in this run</b> (set <code>trainer.eval_every</code> '
            "and give held-out data): only the training curves are shown.</p>"
        )

    names = reward_names(metrics, evaluations)
    out.append("<h2>Reward over training</h2>")
    out.append(
        '<p class="note">Training batch mean: the stochastic rollouts the update learns from (noisy); '
        "held-out mean: deterministic rollouts of the held-out rows.</p>"
    )
    out.append(f'<div class="charts">{"".join(reward_charts(metrics, names))}</div>')
    charts = training_charts(metrics)
    if charts:
        out.append("<h2>Optimisation</h2>")
        out.append(f'<div class="charts">{"".join(charts)}</div>')

    if evaluations:
        out.append(_samples(run_dir, folders, evaluations, comparisons, num_videos))

    out.append("<h2>Files</h2><ul>")
    for file, what in (
        (METRICS_FILE, "every logged metric, one JSON line per iteration"),
        ("resolved_recipe.yaml", "the recipe with every default filled in; runs again as it is"),
        ("eval/", "per-sample held-out rewards (results.json) and videos of every evaluation"),
        ("final/", "the trained policy (diffusers layout)"),
    ):
        if (run_dir / file).exists():
            out.append(f'<li><a href="{file}">{file}</a>: {what}</li>')
    out.append("</ul>")
    if recipe_text:
        out.append(
            "<details><summary>resolved recipe (click to show)</summary>"
            f"<pre>{html.escape(recipe_text)}</pre></details>"
        )
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    out.append(f'<p class="note">Written {stamp} by nextscene from {html.escape(str(run_dir))}.</p>')
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(str(name))}: run report</title><style>{CSS}</style></head>"
        f"<body><main>{''.join(out)}</main></body></html>"
    )


def _samples(
    run_dir: Path,
    folders: Sequence[Path],
    evaluations: Sequence[EvalResults],
    comparisons: Sequence[Comparison],
    num_videos: int,
) -> str:
    before, after = evaluations[0], evaluations[-1] if len(evaluations) > 1 else None
    rows = [r for r in before.videos if after is None or r in after.videos][:num_videos]
    if not rows:
        return ""
    primary = comparisons[0].name
    out = [
        "<h2>Held-out samples</h2>",
        f'<p class="note">Generation 0 of the first held-out rows, sampled from the same noise before '
        f"and after RL; its <b>{html.escape(primary)}</b> score in the caption.</p>",
    ]
    media = run_dir / REPORT_VIDEOS_DIR
    media.mkdir(exist_ok=True)
    for row in rows:
        gif, labels, (height, width) = sample_gif(
            folders[0], folders[-1] if after is not None else None, before.videos[row],
            after.videos[row] if after is not None else None,
        )  # fmt: skip
        (media / f"row{row:04d}.gif").write_bytes(gif)
        score = before.scores[primary][before.rows.index(row)][0]
        text = f"{primary}: {_fmt(score, 3)}"
        if after is not None:
            new = after.scores[primary][after.rows.index(row)][0]
            delta = None if score is None or new is None else new - score
            text = (
                f"{primary}: before <b>{_fmt(score, 3)}</b> &rarr; after <b>{_fmt(new, 3)}</b> "
                f'<span class="{_delta_class(delta)}">({_signed(delta)})</span>'
            )
        prompt = before.prompts.get(row)
        said = f" &middot; &ldquo;{html.escape(prompt)}&rdquo;" if prompt else ""
        out.append(
            f'<div class="sample" data-row="{row}" data-panels="{html.escape(" | ".join(labels))}">'
            f'<img class="sample-video" alt="held-out row {row}: {html.escape(" | ".join(labels))}" '
            f'width="{width}" height="{height}" src="{_data_uri(gif, "image/gif")}">'
            f'<div class="caption" style="max-width:{max(width, 320)}px">held-out row {row}{said}<br>{text}'
            "</div></div>"
        )
    return "".join(out)


def write_report(
    run_dir: str | os.PathLike[str], *, threshold: float = DEFAULT_THRESHOLD, num_videos: int = 4
) -> Path:
    """Write ``run_dir/report.html`` (and the GIFs it embeds to ``run_dir/report_videos/``)."""
    page = build_report(run_dir, threshold=threshold, num_videos=num_videos)
    path = Path(run_dir) / REPORT_FILE
    staging = path.with_name(f".{REPORT_FILE}.tmp-{os.getpid()}")
    staging.write_text(page, encoding="utf-8")
    os.replace(staging, path)
    return path
