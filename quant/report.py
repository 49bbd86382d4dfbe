"""A self-contained HTML report of a lesion analysis: maximum-intensity projections with the
lesion VOIs, fused PET/CT (or SPECT/CT) slices through each lesion with VOI contours, the lesion
and reference tables and the selection verdicts with their reasons.

Images are rendered with numpy alone (no plotting library) and written as PNG through zlib,
then inlined as base64 ``data:`` URIs, so the report is one file with no external resource.
Display conventions: coronal and sagittal MIPs with the head up; axial slices in radiological
orientation (patient right on the image left, anterior up) for images with LPS geometry.
SUV windows are in the SUV image's unit (g/mL for SUVbw), CT windows in HU.
"""

from __future__ import annotations

import base64
import html
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

# distinct, colour-blind-friendly outline colours (Okabe-Ito), cycled over lesions
PALETTE = np.array([(0, 158, 115), (86, 180, 233), (230, 159, 0), (204, 121, 167), (0, 114, 178), (213, 94, 0), (240, 228, 66), (0, 0, 0)], dtype=np.uint8)


@dataclass(frozen=True)
class ReportSettings:
    """Display settings: MIP window [0, ``mip_suv_max``] (SUV, inverted grey); fused slices
    with PET in [0, ``fused_suv_max``] on CT window ``ct_window`` (HU, low/high); display pixel
    ``pixel_mm`` (mm); at most ``max_lesion_slices`` fused slices."""

    mip_suv_max: float = 10.0
    fused_suv_max: float = 15.0
    ct_window: tuple[float, float] = (-160.0, 240.0)
    pixel_mm: float = 1.5
    max_lesion_slices: int = 8
    title: str = "theraflow: tumour uptake and theranostic selection"


# --------------------------------------------------------------------------- PNG


def png_bytes(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB (H×W×3) or grey (H×W) array as PNG bytes (zlib, filter type 0)."""
    array = np.ascontiguousarray(rgb, dtype=np.uint8)
    if array.ndim == 2:
        colour_type, channels = 0, 1
    elif array.ndim == 3 and array.shape[2] == 3:
        colour_type, channels = 2, 3
    else:
        raise ValueError("expected H×W or H×W×3")
    height, width = array.shape[:2]
    raw = np.zeros((height, 1 + width * channels), dtype=np.uint8)
    raw[:, 1:] = array.reshape(height, width * channels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + chunk(b"IEND", b"")


def data_uri(rgb: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(rgb)).decode("ascii")


# --------------------------------------------------------------------------- colour


def _unit(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.clip((values - low) / max(high - low, 1e-12), 0.0, 1.0)


def grey(values: np.ndarray, low: float, high: float, inverted: bool = False) -> np.ndarray:
    u = _unit(values, low, high)
    if inverted:
        u = 1.0 - u
    return np.repeat((u * 255.0 + 0.5).astype(np.uint8)[..., None], 3, axis=-1)


def hot(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Black–red–yellow–white ('hot') colour map, float RGB in [0, 1]."""
    u = _unit(values, low, high)
    return np.stack([np.clip(3 * u, 0, 1), np.clip(3 * u - 1, 0, 1), np.clip(3 * u - 2, 0, 1)], axis=-1)


def _outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=np.ones((3, 3)), border_value=0)


def _paint_outlines(rgb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    out = rgb.copy()
    for label in np.unique(labels[labels > 0]):
        edge = _outline(labels == label)
        out[edge] = PALETTE[(int(label) - 1) % len(PALETTE)]
    return out


def _zoom(array: np.ndarray, factors: Sequence[float], order: int) -> np.ndarray:
    return ndimage.zoom(array, factors, order=order, mode="nearest", grid_mode=True)


# --------------------------------------------------------------------------- images


def mip_images(suv: sitk.Image, labels: sitk.Image | None, settings: ReportSettings) -> dict[str, np.ndarray]:
    """Coronal and sagittal MIPs (inverted grey, head up) with lesion outlines, as RGB arrays.
    Assumes an axial image (direction close to identity)."""
    values = sitk.GetArrayViewFromImage(suv).astype(np.float32)  # z, y, x
    lab = sitk.GetArrayViewFromImage(labels) if labels is not None else None
    sx, sy, sz = suv.GetSpacing()
    views = {}
    for name, axis, (row_mm, col_mm) in (("coronal", 1, (sz, sx)), ("sagittal", 2, (sz, sy))):
        projection = values.max(axis=axis)[::-1]  # head up
        factors = (row_mm / settings.pixel_mm, col_mm / settings.pixel_mm)
        rgb = grey(_zoom(projection, factors, 1), 0.0, settings.mip_suv_max, inverted=True)
        if lab is not None:
            # the label of each projected ray: the lesion with the highest SUV along it
            masked = np.where(lab > 0, values, -np.inf)
            ray = np.take_along_axis(lab, np.expand_dims(np.argmax(masked, axis=axis), axis), axis=axis).squeeze(axis)
            ray = np.where(np.isfinite(masked.max(axis=axis)), ray, 0)[::-1]
            rgb = _paint_outlines(rgb, _zoom(ray, factors, 0))
        if name == "sagittal":
            rgb = rgb[:, ::-1]  # anterior on the left, as usual for a sagittal view from the patient's left
        views[name] = rgb
    return views


def fused_slice(suv: sitk.Image, labels: sitk.Image | None, ct: sitk.Image | None, z_mm: float,
                settings: ReportSettings) -> np.ndarray:
    """An axial slice at ``z_mm`` (mm, LPS) of PET (hot, alpha by SUV) over CT (grey), with
    lesion outlines; PET alone on black without CT. RGB uint8."""
    size = suv.GetSize()
    spacing = suv.GetSpacing()
    width_mm, height_mm = size[0] * spacing[0], size[1] * spacing[1]
    plane = sitk.Image([max(int(round(width_mm / settings.pixel_mm)), 1), max(int(round(height_mm / settings.pixel_mm)), 1), 1], sitk.sitkFloat32)
    plane.SetSpacing((settings.pixel_mm, settings.pixel_mm, spacing[2]))
    corner = suv.TransformContinuousIndexToPhysicalPoint((-0.5, -0.5, 0.0))
    plane.SetOrigin((corner[0] + settings.pixel_mm / 2, corner[1] + settings.pixel_mm / 2, z_mm))
    identity = sitk.Transform()
    pet = sitk.GetArrayFromImage(sitk.Resample(suv, plane, identity, sitk.sitkLinear, 0.0, sitk.sitkFloat32))[0]
    colour = hot(pet, 0.0, settings.fused_suv_max)
    alpha = _unit(pet, 0.0, 0.5 * settings.fused_suv_max)[..., None] * 0.8
    if ct is not None:
        base = sitk.GetArrayFromImage(sitk.Resample(ct, plane, identity, sitk.sitkLinear, -1000.0, sitk.sitkFloat32))[0]
        background = grey(base, *settings.ct_window).astype(np.float32) / 255.0
        rgb = (1.0 - alpha) * background + alpha * colour
    else:
        rgb = colour
    out = (np.clip(rgb, 0, 1) * 255.0 + 0.5).astype(np.uint8)
    if labels is not None:
        lab = sitk.GetArrayFromImage(sitk.Resample(labels, plane, identity, sitk.sitkNearestNeighbor, 0, labels.GetPixelID()))[0]
        out = _paint_outlines(out, lab)
    return out


def registration_figure(fixed_ct: sitk.Image, moving_ct: sitk.Image, before: sitk.Transform, after: sitk.Transform,
                        settings: ReportSettings | None = None, tile_mm: float = 24.0) -> np.ndarray:
    """The quality figure of a CT-to-CT registration: checkerboards of the fixed CT and the
    moving CT resampled onto it (``before``: the initial transform, ``after``: the result; both
    fixed point → moving point, mm) in the axial and coronal planes through the centre of the
    fixed CT, tiles of ``tile_mm`` (mm), CT window ``settings.ct_window`` (HU). Edges that run
    straight across tile borders mean aligned anatomy. Layout: [axial before | axial after] over
    [coronal before | coronal after], RGB uint8, separated by a 4-pixel white gap."""
    settings = settings or ReportSettings()
    panels = []
    for transform in (before, after):
        moved = sitk.Resample(sitk.Cast(moving_ct, sitk.sitkFloat32), fixed_ct, transform, sitk.sitkLinear, -1000.0, sitk.sitkFloat32)
        panels.append(_checkerboards(fixed_ct, moved, settings, tile_mm))
    gap = 4
    rows = []
    for view in range(2):
        left, right = panels[0][view], panels[1][view]
        height = max(left.shape[0], right.shape[0])
        row = np.full((height, left.shape[1] + gap + right.shape[1], 3), 255, np.uint8)
        row[: left.shape[0], : left.shape[1]] = left
        row[: right.shape[0], left.shape[1] + gap :] = right
        rows.append(row)
    width = max(r.shape[1] for r in rows)
    out = np.full((rows[0].shape[0] + gap + rows[1].shape[0], width, 3), 255, np.uint8)
    out[: rows[0].shape[0], : rows[0].shape[1]] = rows[0]
    out[rows[0].shape[0] + gap :, : rows[1].shape[1]] = rows[1]
    return out


def _checkerboards(fixed: sitk.Image, moved: sitk.Image, settings: ReportSettings, tile_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Axial (anterior up) and coronal (head up) checkerboards through the volume centre, display pixels of ``settings.pixel_mm``."""
    a = sitk.GetArrayViewFromImage(fixed).astype(np.float32)  # z, y, x
    b = sitk.GetArrayViewFromImage(moved).astype(np.float32)
    sx, sy, sz = fixed.GetSpacing()
    zc, yc = a.shape[0] // 2, a.shape[1] // 2
    views = []
    for plane_a, plane_b, (row_mm, col_mm), flip in ((a[zc], b[zc], (sy, sx), False), (a[:, yc], b[:, yc], (sz, sx), True)):
        rows = np.arange(plane_a.shape[0]) * row_mm // tile_mm
        cols = np.arange(plane_a.shape[1]) * col_mm // tile_mm
        checker = ((rows[:, None] + cols[None, :]) % 2).astype(bool)
        plane = np.where(checker, plane_b, plane_a)
        if flip:
            plane = plane[::-1]  # head up
        factors = (row_mm / settings.pixel_mm, col_mm / settings.pixel_mm)
        views.append(grey(_zoom(plane, factors, 1), *settings.ct_window))
    return views[0], views[1]


# --------------------------------------------------------------------------- HTML


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#1b1b1b;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:24px 0 8px;border-bottom:1px solid #ccc;padding-bottom:4px}
.meta{color:#555;font-size:13px} table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right} th{background:#f0f0f0} td.l,th.l{text-align:left}
.badge{display:inline-block;padding:3px 10px;border-radius:12px;font-weight:600;color:#fff}
.yes{background:#1a7f37}.no{background:#b42318}.und{background:#8a6d00}
.figs{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start} figure{margin:0} figcaption{font-size:12px;color:#555}
.swatch{display:inline-block;width:12px;height:12px;border:1px solid #333;vertical-align:middle;margin-right:4px}
ul.reasons{margin:4px 0 12px 18px;font-size:14px} .note{font-size:12px;color:#555}
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return _esc(value)


def _badge(eligible: bool | None) -> str:
    if eligible is True:
        return '<span class="badge yes">eligible</span>'
    if eligible is False:
        return '<span class="badge no">not eligible</span>'
    return '<span class="badge und">undetermined</span>'


def _verdict_html(verdict: Mapping[str, Any]) -> str:
    parts = [f"<h3>{_esc(verdict['criterion'])} {_badge(verdict['eligible'])}</h3>", f"<p>{_esc(verdict['summary'])}</p>",
             "<p>Decided by:</p><ul class=\"reasons\">"]
    for finding in verdict["decided_by"]:
        parts.append(f"<li><code>{_esc(finding['rule'])}</code>: {_esc(finding['detail'])}</li>")
    parts.append("</ul>")
    others = [f for f in verdict["findings"] if f not in verdict["decided_by"]]
    if others:
        parts.append("<details><summary>All rules evaluated</summary><ul class=\"reasons\">")
        parts.extend(f"<li><code>{_esc(f['rule'])}</code> ({_esc(f['passed'])}): {_esc(f['detail'])}</li>" for f in others)
        parts.append("</ul></details>")
    if verdict.get("not_assessed"):
        parts.append("<p class=\"note\">Not assessed: " + "; ".join(_esc(n) for n in verdict["not_assessed"]) + "</p>")
    return "\n".join(parts)


def render_html(*, suv: sitk.Image, labels: sitk.Image | None, ct: sitk.Image | None, lesion_rows: Sequence[Mapping[str, Any]],
                references: Mapping[str, Mapping[str, float]], selection: Mapping[str, Any], burden: Mapping[str, Any],
                method: str, notes: Sequence[str] = (), study: Mapping[str, Any] | None = None,
                registration: Mapping[str, Any] | None = None, registration_rgb: np.ndarray | None = None,
                settings: ReportSettings | None = None) -> str:
    """The whole report as one HTML string (images inline). ``registration``: the provenance of
    the masks-CT registration (as in selection.json), shown with its quality figure
    ``registration_rgb`` (see :func:`registration_figure`)."""
    settings = settings or ReportSettings()
    study = study or {}
    mips = mip_images(suv, labels, settings)
    figures = [f'<figure><img alt="{name} MIP" src="{data_uri(rgb)}" width="{rgb.shape[1]}" height="{rgb.shape[0]}">'
               f"<figcaption>{name} MIP, SUV 0–{settings.mip_suv_max:g} (inverted)</figcaption></figure>" for name, rgb in mips.items()]
    slices = []
    for row in list(lesion_rows)[: settings.max_lesion_slices]:
        z = float(str(row["centroid_mm"]).split()[2])
        rgb = fused_slice(suv, labels, ct, z, settings)
        kind = "PET/CT" if ct is not None else "PET"
        slices.append(f'<figure><img alt="lesion {row["label"]}" src="{data_uri(rgb)}" width="{rgb.shape[1] // 2 * 2}">'
                      f"<figcaption>Lesion {_esc(row['label'])}: axial {kind} at z = {z:.1f} mm, SUV 0–{settings.fused_suv_max:g}</figcaption></figure>")
    columns = [("label", "#"), ("name", "VOI"), ("site", "site"), ("volume_mL", "volume mL"), ("suv_max", "SUVmax"), ("suv_mean", "SUVmean"),
               ("suv_peak", "SUVpeak"), ("tlu", "TLU g"), ("long_axis_mm", "long axis mm"), ("short_axis_mm", "short axis mm"),
               ("lesion_to_liver", "L/liver"), ("lesion_to_parotid", "L/parotid"), ("promise_score", "miPSMA")]
    head = "".join(f"<th>{_esc(title)}</th>" for _, title in columns)
    body = []
    for row in lesion_rows:
        colour = PALETTE[(int(row["label"]) - 1) % len(PALETTE)]
        cells = []
        for key, _ in columns:
            value = row.get(key)
            if key == "label":
                cells.append(f'<td class="l"><span class="swatch" style="background:rgb({colour[0]},{colour[1]},{colour[2]})"></span>{_esc(value)}</td>')
            elif key in ("name", "site"):
                cells.append(f'<td class="l">{_esc(value)}</td>')
            else:
                cells.append(f"<td>{_fmt(value)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    if not body:
        body.append(f'<tr><td class="l" colspan="{len(columns)}">no lesion found</td></tr>')
    ref_rows = "".join(f"<tr><td class=\"l\">{_esc(name)}</td><td>{_fmt(r['suv_mean'])}</td><td>{_fmt(r['suv_sd'])}</td>"
                       f"<td>{_fmt(r['suv_max'])}</td><td>{_fmt(r['volume_mL'], 1)}</td></tr>" for name, r in sorted(references.items()))
    promise = selection.get("promise", {})
    verdicts = "\n".join(_verdict_html(selection[key]) for key in ("vision", "therap") if key in selection)
    meta = " · ".join(f"{_esc(k)}: {_esc(v)}" for k, v in study.items())
    burden_text = (f"{burden['lesions']} lesion(s), total volume {_fmt(burden['volume_mL'], 1)} mL, total lesion uptake "
                   f"{_fmt(burden['total_lesion_uptake'], 1)} g, SUVmean {_fmt(burden['suv_mean'])}, SUVmax {_fmt(burden['suv_max'])}")
    note_items = "".join(f"<li>{_esc(n)}</li>" for n in notes)
    registration_html = _registration_html(registration, registration_rgb)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_esc(settings.title)}</title><style>{_CSS}</style></head>
<body>
<h1>{_esc(settings.title)}</h1>
<div class="meta">{meta} · generated {datetime.now().isoformat(timespec='seconds')} · research use, not for clinical decisions without review</div>
<h2>Selection</h2>
{verdicts}
<h3>PROMISE miPSMA</h3>
<p>Highest score: {_fmt(promise.get('highest_score'))} (score 2 reference: {_esc(promise.get('reference_for_score_2', 'liver'))}); counts by score: {_esc(promise.get('counts', {}))}</p>
<h2>Images</h2>
<div class="figs">{''.join(figures)}</div>
<div class="figs">{''.join(slices)}</div>
<h2>Lesions</h2>
<p>{_esc(method)}</p>
<p>Whole body: {burden_text}</p>
<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>
<h2>Reference regions</h2>
<table><thead><tr><th class="l">region</th><th>SUVmean</th><th>SD</th><th>SUVmax</th><th>volume mL</th></tr></thead><tbody>{ref_rows}</tbody></table>
{registration_html}
<h2>Notes</h2><ul class="note">{note_items}</ul>
</body></html>
"""


def _registration_html(registration: Mapping[str, Any] | None, rgb: np.ndarray | None) -> str:
    """The registration section: what was registered to what, the rigid parameters, the quality
    numbers and the checkerboard figure; empty without a registration."""
    if not registration:
        return ""
    quality = registration.get("quality") or {}
    parts = ["<h2>Registration of the masks CT</h2>",
             f"<p>{_esc(registration.get('summary', ''))}</p>"]
    if quality:
        verdict = "acceptable" if quality.get("acceptable") else "not acceptable"
        parts.append(
            "<table><thead><tr><th class=\"l\">figure</th><th>before</th><th>after</th></tr></thead><tbody>"
            f"<tr><td class=\"l\">NCC (CT vs CT, body)</td><td>{_fmt(quality.get('ncc_before'), 3)}</td><td>{_fmt(quality.get('ncc_after'), 3)}</td></tr>"
            f"<tr><td class=\"l\">NMI</td><td>{_fmt(quality.get('nmi_before'), 3)}</td><td>{_fmt(quality.get('nmi_after'), 3)}</td></tr>"
            f"</tbody></table><p>Final Mattes MI {_fmt(quality.get('final_metric'), 4)}; {_esc(verdict)}: {_esc(quality.get('reason', ''))}. "
            f"Rotation {_esc([round(v, 2) for v in registration.get('rotation_deg', [])])} deg, translation "
            f"{_esc([round(v, 2) for v in registration.get('translation_mm', [])])} mm (PET/CT point → masks CT point, LPS).</p>")
    if rgb is not None:
        parts.append(f'<figure><img alt="registration checkerboard" src="{data_uri(rgb)}" width="{rgb.shape[1]}" height="{rgb.shape[0]}">'
                     "<figcaption>Checkerboards of the PET/CT's CT and the masks CT: left before, right after registration; "
                     "top axial, bottom coronal</figcaption></figure>")
    return "\n".join(parts)
