"""The dosimetry report: one self-contained HTML file (time–activity plots with their fits, the
dose table with uncertainties and their largest components, the absorbed-dose map fused on the
CT), and its PDF printed by headless Chromium when it is installed.

Plots are rasterised with numpy (no plotting library) and inlined as PNG data URIs
(quant.report). Axes: time in h after the administration, activity in MBq.
"""

from __future__ import annotations

import html
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from quant.report import PALETTE, ReportSettings, data_uri, fused_slice

WIDTH, HEIGHT, MARGIN = 420, 260, 30


def _line(canvas: np.ndarray, x0: float, y0: float, x1: float, y1: float, colour: Sequence[int]) -> None:
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.clip(np.rint(np.linspace(x0, x1, n)).astype(int), 0, canvas.shape[1] - 1)
    ys = np.clip(np.rint(np.linspace(y0, y1, n)).astype(int), 0, canvas.shape[0] - 1)
    canvas[ys, xs] = colour


def tac_plot(times_h: Sequence[float], activities: Sequence[float], curve: Any) -> tuple[np.ndarray, float, float]:
    """RGB plot of measured activities (squares) and the fitted curve (line) from 0 to 1.5 × the
    last time, ticks at fifths of the axes; returns it and the axes' ends (h, MBq)."""
    canvas = np.full((HEIGHT, WIDTH, 3), 255, dtype=np.uint8)
    t_max = 1.5 * max(times_h)
    grid = np.linspace(0.0, t_max, 400)
    fitted = np.asarray(curve(grid), dtype=np.float64)
    a_max = max(float(np.max(activities)), float(np.max(fitted))) * 1.1 or 1.0

    def to_px(t: float, a: float) -> tuple[float, float]:
        return MARGIN + t / t_max * (WIDTH - 2 * MARGIN), HEIGHT - MARGIN - a / a_max * (HEIGHT - 2 * MARGIN)

    black = (0, 0, 0)
    _line(canvas, *to_px(0, 0), *to_px(t_max, 0), black)
    _line(canvas, *to_px(0, 0), *to_px(0, a_max), black)
    for k in range(1, 6):  # ticks every fifth of the axes
        x, y = to_px(k * t_max / 5, 0)
        _line(canvas, x, y, x, y + 4, black)
        x, y = to_px(0, k * a_max / 5)
        _line(canvas, x - 4, y, x, y, black)
    points = [to_px(t, a) for t, a in zip(grid, fitted)]
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        _line(canvas, x0, y0, x1, y1, PALETTE[4])
    for t, a in zip(times_h, activities):
        x, y = (int(round(v)) for v in to_px(t, a))
        canvas[max(y - 3, 0):y + 4, max(x - 3, 0):x + 4] = PALETTE[5]
    return canvas, t_max, a_max


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return html.escape(str(value))


def _pm(item: Mapping[str, Any] | None) -> str:
    if not item:
        return "–"
    shares = item.get("shares") or {}
    largest = max(shares, key=shares.get) if shares else None
    text = f"{item['value']:.3g} ± {item['sd']:.2g} ({100 * item['relative_sd']:.0f} %)"
    return text + (f"<br><small>largest: {html.escape(largest)} {100 * shares[largest]:.0f} %</small>" if largest else "")


def html_report(data: Mapping[str, Any], results: Sequence[Any], times_h: Sequence[float], dose: sitk.Image,
                ct: sitk.Image | None, masks: Mapping[str, sitk.Image]) -> str:
    """The report page (see the module docstring)."""
    rows, plots = [], []
    for result, item in zip(results, data["vois"]):
        integration = result.integration
        model = getattr(integration, "model", None) or integration.method
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in (
            html.escape(result.name), result.kind, html.escape(model), _fmt(result.mass_g), _pm(item["tia_MBq_h"]), _fmt(result.tiac_h),
            _pm(item["dose_Gy"]), _pm(item["bed_Gy"]), _fmt(item["voxel_dvh"]["mean_Gy"]), _fmt(item["voxel_dvh"]["D2_Gy"]))) + "</tr>")
        if hasattr(integration, "evaluate"):
            image, t_max, a_max = tac_plot(integration.times_h, integration.activities_MBq, integration.evaluate)
            plots.append(f"<figure><img src='{data_uri(image)}' alt='TAC {html.escape(result.name)}'>"
                         f"<figcaption>{html.escape(result.name)}: {html.escape(model)}; time 0–{t_max:.0f} h, "
                         f"activity 0–{a_max:.3g} MBq (ticks at fifths)</figcaption></figure>")
    labels = np.zeros(dose.GetSize()[::-1], dtype=np.uint8)
    for number, mask in enumerate(masks.values(), start=1):
        labels[sitk.GetArrayViewFromImage(mask) != 0] = number
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(dose)
    peak = float(np.percentile(sitk.GetArrayViewFromImage(dose), 99.9)) or 1.0
    settings = ReportSettings(fused_suv_max=peak, title="theraflow: post-therapy dosimetry")
    slices = []
    for name, mask in list(masks.items())[:8]:
        k = float(np.argwhere(sitk.GetArrayViewFromImage(mask)).mean(axis=0)[0])
        z = dose.TransformContinuousIndexToPhysicalPoint((0.0, 0.0, k))[2]
        slices.append(f"<figure><img src='{data_uri(fused_slice(dose, label_image, ct, z, settings))}' alt='dose {html.escape(name)}'>"
                      f"<figcaption>{html.escape(name)}: z = {z:.0f} mm, dose 0–{peak:.3g} Gy (hot) on CT</figcaption></figure>")
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in data.get("notes", []))
    mc = data.get("monte_carlo_check")
    mc_text = "" if not mc else (f"<p>Monte Carlo check ({mc['repetitions']} repetitions): dose SD " + ", ".join(
        f"{html.escape(k)} {v:.3g} Gy" for k, v in mc["dose_sd"].items()) + "</p>")
    return f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>{settings.title}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #999;padding:4px 8px;text-align:right}}
figure{{display:inline-block;margin:6px}}</style></head><body>
<h1>{settings.title}</h1>
<p>Administration {html.escape(str(data['inputs']['administration_time']))}, {_fmt(data['inputs']['administered_MBq'])} MBq;
time points at {', '.join(f'{t:.1f}' for t in times_h)} h. Values ± standard uncertainty (EANM, Gear et al. 2018).</p>
<h2>Absorbed doses</h2><table><tr><th>VOI</th><th>kind</th><th>TAC</th><th>mass (g)</th><th>TIA (MBq·h)</th><th>TIAC (h)</th>
<th>dose (Gy)</th><th>BED (Gy)</th><th>voxel mean (Gy)</th><th>voxel D2 (Gy)</th></tr>{''.join(rows)}</table>{mc_text}
<h2>Time–activity curves</h2>{''.join(plots)}
<h2>Absorbed-dose map</h2>{''.join(slices)}
<h2>Notes</h2><ul>{notes}</ul></body></html>
"""


def write_pdf(html_path: Path, pdf_path: Path, timeout_s: float = 120.0) -> str | None:
    """Print ``html_path`` to ``pdf_path`` with headless Chromium; returns None on success, else why not."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        return "PDF not written: Chromium not installed"
    with tempfile.TemporaryDirectory() as profile:
        try:
            subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                            "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--no-pdf-header-footer",
                            f"--print-to-pdf={pdf_path}", html_path.as_uri()], capture_output=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return "PDF not written: Chromium timed out"
    return None if pdf_path.is_file() and pdf_path.stat().st_size > 0 else "PDF not written: Chromium failed"
