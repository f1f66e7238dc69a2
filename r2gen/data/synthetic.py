"""Synthetic chest X-ray studies in R2Gen's IU X-Ray (or MIMIC-CXR) layout, with reports that say what is drawn.

Each study is a procedurally drawn chest: body outline, dark lung fields, bright mediastinum, heart,
spine, ribs, clavicles, diaphragm domes with sharp costophrenic angles, vessel markings, plus a
per-patient pose, size, inspiration and exposure and mild film noise. Findings are drawn on top and
decide the report sentences, so a model has to look at the images to write the right report:

- ``cardiomegaly``: heart 58-66% of the chest width (normal: 38-46%).
- ``effusion`` (side, small|moderate|large): fluid fills the lower hemithorax up to a meniscus that
  rises laterally; the costophrenic angle is blunted; posterior sulcus filled on the lateral view.
- ``consolidation`` (side, upper|lower zone): a dense fluffy patch with one sharp fissure-like edge.
- ``nodule`` (side, upper|lower zone): a small, very bright round calcified granuloma.
- ``pneumothorax`` (side): apical and lateral rim of the hemithorax black and without vessel
  markings, bounded by a thin visceral pleural line.
- a study with none of these is normal (about 30% of studies).

Orientation: frontal views are PA in radiological convention, so the patient's RIGHT is on the
image's LEFT (the heart bulges to the image's right). Lateral views face the image's left: anterior
(sternum, heart) on the left, posterior (spine, posterior costophrenic sulcus) on the right.

The output is deterministic for a seed (byte-identical files for the same numpy and Pillow
versions): study ``index`` draws its findings, images and report from three generators seeded with
``(seed, index, 0|1|2)``, so findings and reports do not depend on the image size; and a drawing
consumes the same random numbers whatever the findings, so a study drawn with and without a
finding shows the same patient.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from r2gen.errors import R2GenError
from r2gen.io import atomic_dir, write_json

FINDINGS: tuple[str, ...] = ("cardiomegaly", "effusion", "consolidation", "nodule", "pneumothorax")
SIDES: tuple[str, ...] = ("right", "left")
EFFUSION_SIZES: tuple[str, ...] = ("small", "moderate", "large")
ZONES: tuple[str, ...] = ("upper", "lower")
LAYOUTS: tuple[str, ...] = ("iu_xray", "mimic_cxr")
SPLITS: tuple[str, ...] = ("train", "val", "test")

# Chance that a study has each finding, drawn independently: (1-p) multiplied over the kinds gives
# ~31% fully normal studies.
PREVALENCE: dict[str, float] = {
    "cardiomegaly": 0.25,
    "effusion": 0.22,
    "consolidation": 0.20,
    "nodule": 0.20,
    "pneumothorax": 0.18,
}

# Meniscus of an effusion: (height at the mediastinum, extra rise at the chest wall), in body units
# (v runs from -1 at the shoulders to +1 in the upper abdomen; the domes top out near 0.45 and meet the
# chest wall near 0.85).
_MENISCUS: dict[str, tuple[float, float]] = {"small": (0.52, 0.18), "moderate": (0.36, 0.18), "large": (0.05, 0.20)}

# Linear map from summed density to grey level before per-study exposure changes.
_GREY_PER_DENSITY = 290.0
_NOISE_GREY = 1.0  # film noise, grey levels (std); small so that PNGs stay a few kB


# --------------------------------------------------------------------------------------------
# Findings
# --------------------------------------------------------------------------------------------


def sample_findings(rng: np.random.Generator) -> dict:
    """Draw one study's ground-truth findings (keys: ``FINDINGS``; None or False means absent).

    Findings are independent except where two would hide each other on the image: a lower-zone
    consolidation moves up on the side of an effusion, a pneumothorax moves to the side without the
    effusion, and a nodule avoids a consolidation or a moderate/large effusion.
    """
    present = rng.random(len(FINDINGS))  # fixed consumption whatever is drawn
    sides = rng.integers(0, 2, size=4)
    size = EFFUSION_SIZES[int(rng.integers(0, 3))]
    zones = rng.integers(0, 2, size=2)
    has = {kind: bool(present[i] < PREVALENCE[kind]) for i, kind in enumerate(FINDINGS)}

    effusion = {"side": SIDES[sides[0]], "size": size} if has["effusion"] else None
    consolidation = {"side": SIDES[sides[1]], "zone": ZONES[zones[0]]} if has["consolidation"] else None
    if consolidation and effusion and consolidation["side"] == effusion["side"]:
        consolidation["zone"] = "upper"
    pneumothorax = {"side": SIDES[sides[3]]} if has["pneumothorax"] else None
    if pneumothorax and effusion and pneumothorax["side"] == effusion["side"]:
        pneumothorax["side"] = _other(effusion["side"])
    nodule = None
    if has["nodule"]:
        first = (SIDES[sides[2]], ZONES[zones[1]])
        places = [first, (first[0], _other_zone(first[1])), (_other(first[0]), first[1]),
                  (_other(first[0]), _other_zone(first[1]))]
        for side, zone in places:
            hidden_by_consolidation = consolidation == {"side": side, "zone": zone}
            hidden_by_effusion = (effusion is not None and effusion["side"] == side and zone == "lower"
                                  and effusion["size"] != "small")
            if not (hidden_by_consolidation or hidden_by_effusion):
                nodule = {"side": side, "zone": zone}
                break
    return {
        "cardiomegaly": has["cardiomegaly"],
        "effusion": effusion,
        "consolidation": consolidation,
        "nodule": nodule,
        "pneumothorax": pneumothorax,
    }


def is_normal(findings: dict) -> bool:
    """True when a study has none of the drawn findings."""
    return not any(findings[kind] for kind in FINDINGS)


def _other(side: str) -> str:
    return "left" if side == "right" else "right"


def _other_zone(zone: str) -> str:
    return "lower" if zone == "upper" else "upper"


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------
# Shapes are analytic functions of "body" coordinates: u across the chest (patient's right at
# u < 0, which is the image's left; the lateral chest wall near |u| = 0.95) and v down the chest
# (shoulders near -0.9, diaphragm domes near 0.45-0.6). Densities add up along the ray as on a
# radiograph: soft tissue is bright, air in the lungs subtracts, bone and fluid add.


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _superellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float,
                  power: float = 2.0) -> np.ndarray:
    """Approximate signed distance to a superellipse's edge, positive inside (body units)."""
    r = (np.abs(x - cx) / ax) ** power + (np.abs(y - cy) / ay) ** power
    return (1.0 - r ** (1.0 / power)) * min(ax, ay)


def _segment_distance(x: np.ndarray, y: np.ndarray, p0: tuple[float, float],
                      p1: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Distance of every point to the segment p0-p1, and the position along it (0 at p0, 1 at p1)."""
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    t = np.clip(((x - p0[0]) * dx + (y - p0[1]) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return np.hypot(x - p0[0] - t * dx, y - p0[1] - t * dy), t


def _draw_patient(rng: np.random.Generator) -> dict:
    """Anatomy, pose and exposure of one patient (always the same number of random draws)."""
    r = rng.random(20)
    return {
        "scale": 0.80 + 0.10 * r[0],  # chest half-width in image half-widths (patient size)
        "aspect": 0.95 + 0.10 * r[1],  # chest height relative to width
        "shift": (0.06 * (r[2] - 0.5), 0.06 * (r[3] - 0.5)),
        "rotation": math.radians(6.0 * (r[4] - 0.5)),
        "lateral_rotation": math.radians(6.0 * (r[5] - 0.5)),
        "dome": 0.42 + 0.08 * r[6],  # top of the right hemidiaphragm (inspiration)
        "ctr": 0.38 + 0.08 * r[7],  # cardiothoracic ratio when the heart is normal
        "ctr_enlarged": 0.58 + 0.08 * r[8],  # ... and when it is enlarged
        "air": 0.36 + 0.05 * r[9],  # lung aeration
        "tissue": 0.48 + 0.06 * r[10],  # soft-tissue density (body habitus)
        "rib_phase": 0.03 * r[11],
        "bubble": 0.6 * r[12] if r[12] > 0.3 else 0.0,  # gastric air under the left dome
        "gain": 0.88 + 0.24 * r[13],  # exposure
        "offset": 6.0 + 12.0 * r[14],  # background grey level
        "field": (r[15], r[16], r[17]),  # low-frequency brightness variation (heel effect, scatter)
        "vessel_seed": int(1e9 * r[18]),
        "spine_phase": r[19],
    }


def _draw_geometry(rng: np.random.Generator) -> dict:
    """Placement jitter of every finding kind, drawn whether or not the finding is present."""
    r = rng.random(12)
    return {
        "meniscus_jitter": 0.06 * (r[0] - 0.5),
        "consolidation_center": (0.45 + 0.12 * r[1], 0.08 * (r[2] - 0.5)),  # (a, v offset)
        "consolidation_size": 0.85 + 0.3 * r[3],
        "nodule_a": 0.30 + 0.22 * r[4],
        "nodule_v": r[5],  # fraction of the zone's height range
        "nodule_radius": 0.065 + 0.02 * r[6],  # ~5-7 px wide at 96 px
        "nodule_depth": -0.35 + 0.8 * r[7],  # w position on the lateral view
        "collapse": 0.64 + 0.10 * r[8],  # size of the collapsed lung relative to the hemithorax
        "consolidation_lobes": (r[9], r[10], r[11]),
    }


def _grid(n: int, patient: dict, rotation: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Body coordinates (u, v) of every pixel centre, and the size of one pixel in body units."""
    x = (np.arange(n) + 0.5) / n * 2.0 - 1.0
    xx, yy = np.meshgrid(x, x)  # (n, n): column index is x (image right), row index is y (down)
    sx, sy = patient["shift"]
    c, s = math.cos(rotation), math.sin(rotation)
    u = (c * (xx - sx) + s * (yy - sy)) / patient["scale"]
    v = (-s * (xx - sx) + c * (yy - sy)) / (patient["scale"] * patient["aspect"])
    return u, v, 2.0 / n / patient["scale"]


def _vessels(a: np.ndarray, v: np.ndarray, px: float, seed: int, hilum: tuple[float, float]) -> np.ndarray:
    """Branching vessel markings fanning out from the hilum, fading towards the periphery."""
    rng = np.random.default_rng(seed)
    marks = np.zeros_like(a)
    for k in range(7):
        angle = math.radians(-75.0 + 150.0 * (k + rng.random()) / 7.0)
        length = 0.30 + 0.25 * rng.random()
        end = (hilum[0] + length * math.cos(angle), hilum[1] + length * math.sin(angle))
        d, t = _segment_distance(a, v, hilum, end)
        width = px * (1.4 - 0.8 * t)
        marks = np.maximum(marks, np.exp(-(d / width) ** 2) * (1.0 - 0.7 * t))
        # one side branch per vessel
        mid = (hilum[0] + 0.55 * (end[0] - hilum[0]), hilum[1] + 0.55 * (end[1] - hilum[1]))
        turn = angle + math.radians(35.0 if rng.random() < 0.5 else -35.0)
        tip = (mid[0] + 0.16 * math.cos(turn), mid[1] + 0.16 * math.sin(turn))
        d, t = _segment_distance(a, v, mid, tip)
        marks = np.maximum(marks, np.exp(-(d / (0.8 * px)) ** 2) * 0.5 * (1.0 - 0.7 * t))
    return marks


def _hemithorax(a: np.ndarray, v: np.ndarray, px: float, dome_top: float) -> np.ndarray:
    """One side's thoracic cavity (0..1): rounded apex, chest wall, mediastinal border, diaphragm dome.

    The dome meets the chest wall at a sharp costophrenic angle (blunted by an effusion).
    """
    apex = -0.84 + 1.1 * (a - 0.45) ** 2
    wall = 0.95 - 0.28 * np.clip((-0.15 - v) / 0.7, 0.0, 1.0) ** 2
    dome = dome_top + 1.1 * (a - 0.42) ** 2
    edges = (v - apex, wall - a, a - 0.12, dome - v)
    cavity = np.ones_like(a)
    for distance in edges:
        cavity *= _sigmoid(distance / (0.8 * px))
    return cavity


def _finding_on(findings: dict, kind: str, side: str) -> dict | None:
    item = findings.get(kind)
    return item if item and item["side"] == side else None


def _meniscus(effusion: dict, geometry: dict, lateral_pos: np.ndarray) -> np.ndarray:
    """Height of the fluid surface: lowest medially (or anteriorly), rising towards lateral_pos = 1."""
    level, rise = _MENISCUS[effusion["size"]]
    return level + geometry["meniscus_jitter"] - rise * np.clip(lateral_pos, 0.0, 1.0) ** 2


def _consolidation_patch(a: np.ndarray, v: np.ndarray, px: float, zone: str, geometry: dict) -> np.ndarray:
    """A fluffy lobar opacity (0..1) with one sharp fissure-like edge."""
    ca, dv = geometry["consolidation_center"]
    size = geometry["consolidation_size"]
    cv = (-0.38 if zone == "upper" else 0.22) + dv
    field = np.zeros_like(a)
    for k, r in enumerate(geometry["consolidation_lobes"]):
        oa, ov = 0.12 * math.cos(2.1 * k + 6.0 * r), 0.08 * math.sin(2.1 * k + 6.0 * r)
        field += np.exp(-(((a - ca - oa) / (0.20 * size)) ** 2 + ((v - cv - ov) / (0.17 * size)) ** 2))
    patch = _sigmoid((field - 0.45) / 0.12)
    if zone == "upper":  # horizontal fissure below an upper-lobe consolidation
        patch *= _sigmoid((cv + 0.22 - v) / px)
    else:  # oblique fissure above a lower-lobe consolidation
        patch *= _sigmoid((v - (cv - 0.24) + 0.25 * (a - ca)) / px)
    return patch


def _nodule(x: np.ndarray, v: np.ndarray, px: float, x0: float, zone: str, geometry: dict) -> np.ndarray:
    top, bottom = (-0.38, -0.20) if zone == "upper" else (0.06, 0.26)
    v0 = top + (bottom - top) * geometry["nodule_v"]
    d = np.hypot(x - x0, v - v0)
    return _sigmoid((geometry["nodule_radius"] - d) / (0.7 * px))


def _frontal_density(findings: dict, patient: dict, geometry: dict, n: int) -> np.ndarray:
    """Summed density of a PA view, shape (n, n)."""
    u, v, px = _grid(n, patient, patient["rotation"])

    def inside(d: np.ndarray, softness: float = 0.8) -> np.ndarray:
        return _sigmoid(d / (softness * px))

    # Body: trunk with rounded shoulders, plus the neck; thicker in the middle.
    trunk = inside(np.maximum(_superellipse(u, v, 0.0, 0.22, 1.13, 1.32, 4.0),
                              _superellipse(u, v, 0.0, -1.1, 0.30, 0.45, 2.0)))
    thickness = np.sqrt(np.clip(1.0 - (u / 1.2) ** 2, 0.0, 1.0))
    density = patient["tissue"] * (0.65 + 0.35 * thickness) * trunk

    # Heart: an ellipse shifted to the patient's left (+u); its width is the cardiothoracic ratio
    # times the chest width (2 x 0.93 between the inner rib margins).
    enlarged = findings["cardiomegaly"]
    ctr = patient["ctr_enlarged"] if enlarged else patient["ctr"]
    half_width = ctr * 0.93
    heart_u = 0.10 + (0.06 if enlarged else 0.0)
    heart = inside(_superellipse(u, v, heart_u, 0.26, half_width, 0.33 if enlarged else 0.30), 1.2)
    knob = inside(_superellipse(u, v, 0.16, -0.38, 0.10, 0.08), 1.2)  # aortic knob
    density += 0.06 * heart

    # Spine behind the mediastinum, with disc spaces every ~0.14.
    spine = inside(0.075 - np.abs(u))
    discs = 0.8 + 0.2 * np.cos(2 * math.pi * (v / 0.14 + patient["spine_phase"]))
    density += 0.10 * spine * discs * trunk

    for side in SIDES:
        a = -u if side == "right" else u  # distance from the midline towards this side's chest wall
        cavity = _hemithorax(a, v, px, patient["dome"] + (0.05 if side == "left" else 0.0))
        aerated = cavity * (1.0 - heart) * (1.0 - knob)

        effusion = _finding_on(findings, "effusion", side)
        if effusion:
            fluid = cavity * _sigmoid((v - _meniscus(effusion, geometry, (a - 0.12) / 0.8)) / (2.5 * px))
            aerated *= 1.0 - fluid
            density += 0.03 * fluid

        pneumothorax = _finding_on(findings, "pneumothorax", side)
        lung_tissue = aerated
        if pneumothorax:
            f = geometry["collapse"]
            collapsed = _superellipse(a, v, 0.45, 0.12, 0.42 * f, 0.84 * f, 3.0)
            gap = aerated * (1.0 - inside(collapsed)) * _sigmoid((0.45 - v) / (3 * px))
            lung_tissue = aerated - gap
            density -= 0.10 * gap  # air without lung: blacker than the lung
            density += 0.07 * np.exp(-(collapsed / (0.9 * px)) ** 2) * cavity * (v < 0.45)  # pleural line

        density -= patient["air"] * aerated
        markings = _vessels(a, v, px, patient["vessel_seed"] + (side == "left"), (0.22, -0.02))
        hilum = np.exp(-(((a - 0.22) / 0.08) ** 2 + ((v + 0.02) / 0.12) ** 2))
        density += (0.05 * markings + 0.08 * hilum) * lung_tissue

        consolidation = _finding_on(findings, "consolidation", side)
        if consolidation:
            patch = _consolidation_patch(a, v, px, consolidation["zone"], geometry)
            density += 0.8 * patient["air"] * patch * lung_tissue

        nodule = _finding_on(findings, "nodule", side)
        if nodule:
            density += 0.33 * _nodule(a, v, px, geometry["nodule_a"], nodule["zone"], geometry)

        # Bones: posterior ribs arcing over the lung, and the clavicle.
        for k in range(9):
            centre = -0.80 + 0.16 * k + patient["rib_phase"] - 0.30 * a + 0.50 * a * a
            rib = inside(0.03 - np.abs(v - centre)) * inside(a - 0.04) * inside(0.98 - a)
            density += 0.035 * rib * trunk
        clavicle_v = -0.76 - 0.12 * (a - 0.1) / 0.7 + 0.05 * np.sin(math.pi * (a - 0.1) / 0.7)
        clavicle = inside(0.035 - np.abs(v - clavicle_v)) * inside(a - 0.07) * inside(0.82 - a)
        density += 0.13 * clavicle

        if side == "left" and patient["bubble"] > 0:  # gastric air under the left dome
            bubble = inside(_superellipse(a, v, 0.45, patient["dome"] + 0.2, 0.13 * patient["bubble"] + 0.04, 0.06))
            density -= 0.12 * bubble * trunk
    return density


def _lateral_density(findings: dict, patient: dict, geometry: dict, n: int) -> np.ndarray:
    """Summed density of a left lateral view (anterior on the image's left), shape (n, n)."""
    w, v, px = _grid(n, patient, patient["lateral_rotation"])

    def inside(d: np.ndarray, softness: float = 0.8) -> np.ndarray:
        return _sigmoid(d / (softness * px))

    trunk = inside(np.maximum(_superellipse(w, v, 0.0, 0.2, 0.86, 1.30, 3.5),
                              _superellipse(w, v, 0.05, -1.1, 0.40, 0.45, 2.0)))
    thickness = np.sqrt(np.clip(1.0 - (w / 0.9) ** 2, 0.0, 1.0))
    density = (patient["tissue"] + 0.10) * (0.7 + 0.3 * thickness) * trunk
    density += 0.10 * trunk * _sigmoid((-0.45 - v) / 0.08)  # shoulders and arms over the apices

    enlarged = findings["cardiomegaly"]
    heart = inside(_superellipse(w, v, -0.20 if enlarged else -0.28, 0.25,
                                 0.44 if enlarged else 0.30, 0.33 if enlarged else 0.29), 1.2)
    density += 0.05 * heart

    # Both lungs overlap on a lateral view: each contributes half of the air, each with its own dome
    # sloping down to the posterior costophrenic sulcus.
    posterior = (w + 0.60) / 1.30  # 0 at the anterior, 1 at the posterior chest wall
    apex = -0.84 + 0.8 * (w - 0.05) ** 2
    front = -0.62 + 0.15 * np.clip((-0.2 - v) / 0.6, 0.0, 1.0) ** 2
    back = 0.72 - 0.10 * np.clip((-0.3 - v) / 0.5, 0.0, 1.0) ** 2
    chest = inside(v - apex) * inside(w - front) * inside(back - w)
    aerated_total = np.zeros_like(w)
    for side in SIDES:
        dome = patient["dome"] + (0.05 if side == "left" else 0.0) - 0.06 + 0.45 * np.clip(w + 0.2, 0.0, None) ** 2
        cavity = chest * inside(dome - v)
        aerated = 0.5 * cavity * (1.0 - heart)
        effusion = _finding_on(findings, "effusion", side)
        if effusion:
            fluid = _sigmoid((v - _meniscus(effusion, geometry, posterior)) / (2.5 * px))
            aerated *= 1.0 - fluid
        consolidation = _finding_on(findings, "consolidation", side)
        if consolidation:
            cw, cv = (-0.05, -0.38) if consolidation["zone"] == "upper" else (0.38, 0.28)
            patch = np.exp(-(((w - cw) / 0.28) ** 2 + ((v - cv) / 0.2) ** 2))
            aerated *= 1.0 - 0.8 * _sigmoid((patch - 0.45) / 0.12)
        if _finding_on(findings, "pneumothorax", side):  # barely visible laterally: slightly darker apex
            aerated *= 1.0 + 0.25 * _sigmoid((-0.35 - v) / (3 * px))
        aerated_total += aerated
    density -= (patient["air"] - 0.04) * aerated_total
    markings = _vessels(w, v, px, patient["vessel_seed"] + 2, (0.02, -0.05))
    density += 0.05 * markings * aerated_total

    if findings["nodule"]:
        density += 0.33 * _nodule(w, v, px, geometry["nodule_depth"], findings["nodule"]["zone"], geometry)

    # Spine (vertebral bodies with disc spaces), sternum and the tracheal air column.
    bodies = 0.5 + 0.5 * np.tanh(4.0 * np.cos(2 * math.pi * (v / 0.15 + patient["spine_phase"])))
    spine = inside(np.minimum(w - 0.62, 0.90 - w))
    density += (0.06 + 0.08 * bodies) * spine * trunk
    density += 0.08 * inside(0.035 - np.abs(w + 0.86)) * inside(v + 0.7) * inside(0.35 - v)
    trachea, _ = _segment_distance(w, v, (-0.12, -1.2), (0.05, -0.15))
    density -= 0.10 * inside(0.05 - trachea) * trunk
    return density


def _expose(density: np.ndarray, patient: dict, rng: np.random.Generator) -> np.ndarray:
    """Grey levels (uint8) from density: exposure, smooth brightness variation and film noise."""
    n = density.shape[0]
    y, x = np.mgrid[0:n, 0:n] / n
    f1, f2, f3 = patient["field"]
    field = 1.0 + 0.06 * np.cos(2 * math.pi * (f1 + 0.6 * x + 0.3 * f2 * y)) + 0.04 * (y - 0.5) * (2 * f3 - 1)
    grey = patient["offset"] + patient["gain"] * _GREY_PER_DENSITY * density * field
    grey += rng.normal(0.0, _NOISE_GREY, size=density.shape)
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)


def draw_study(findings: dict, rng: np.random.Generator, image_size: int = 128) -> list[np.ndarray]:
    """Draw one study: [frontal PA, lateral] uint8 grayscale views of shape (image_size, image_size).

    MIMIC-CXR layout writes only the frontal view. The random draws do not depend on the findings,
    so the same ``rng`` state with and without a finding gives the same patient.
    """
    patient = _draw_patient(rng)
    geometry = _draw_geometry(rng)
    frontal = _expose(_frontal_density(findings, patient, geometry, image_size), patient, rng)
    lateral = _expose(_lateral_density(findings, patient, geometry, image_size), patient, rng)
    return [frontal, lateral]


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------
# Sentence order follows IU X-Ray findings: heart, mediastinum, lungs, pleura, bones. The first
# phrasing of each list is the most frequent one, as in real reports where a few templates dominate.

_HEART_NORMAL = (
    "The heart is normal in size.",
    "Heart size is within normal limits.",
    "Normal heart size.",
    "The cardiac silhouette is normal in size.",
)
_HEART_ENLARGED = (
    "The heart is enlarged.",
    "Cardiomegaly is present.",
    "There is cardiomegaly.",
    "The cardiac silhouette is enlarged.",
    "Enlarged cardiac silhouette.",
)
_MEDIASTINUM = (
    "The mediastinal contours are normal.",
    "Mediastinal contours are within normal limits.",
    "Normal mediastinal contour.",
    "The mediastinum is unremarkable.",
)
_HEART_AND_MEDIASTINUM = (  # only for a normal heart
    "The cardiomediastinal silhouette is within normal limits.",
    "Heart size and mediastinal contours are within normal limits.",
    "Normal cardiomediastinal silhouette.",
)
_LUNGS_CLEAR = (
    "The lungs are clear.",
    "Lungs are clear bilaterally.",
    "The lungs are clear without focal consolidation.",
    "No focal consolidation.",
)
_NO_CONSOLIDATION = (
    "No focal consolidation.",
    "There is no focal consolidation.",
    "No focal airspace consolidation.",
)
_CONSOLIDATION = (
    "There is {side} {zone} lobe consolidation.",
    "Consolidation in the {side} {zone} lobe.",
    "Focal airspace consolidation in the {side} {zone} lobe.",
    "{Side} {zone} lobe consolidation is present.",
)
_NODULE = (
    "Calcified granuloma in the {side} {zone} lobe.",
    "There is a calcified granuloma in the {side} {zone} lobe.",
    "A small nodule is seen in the {side} {zone} lobe.",
    "{Side} {zone} lobe nodule.",
)
_EFFUSION = (
    "There is a {size} {side} pleural effusion.",
    "{Size} {side} pleural effusion.",
    "A {size} {side}-sided pleural effusion is present.",
)
_SMALL_EFFUSION_EXTRA = ("Blunting of the {side} costophrenic angle consistent with a small pleural effusion.",)
_PNEUMOTHORAX = (
    "There is a {side} apical pneumothorax.",
    "{Side} pneumothorax.",
    "A {side}-sided pneumothorax is present.",
    "{Side} pneumothorax with a visible pleural edge.",
)
_NO_EFFUSION_OR_PNEUMOTHORAX = (
    "No pleural effusion or pneumothorax.",
    "There is no pleural effusion or pneumothorax.",
    "No pneumothorax or pleural effusion.",
    "No pleural effusion. No pneumothorax.",
    "The costophrenic angles are sharp. No pneumothorax.",
)
_NO_EFFUSION = ("No pleural effusion.", "There is no pleural effusion.", "The costophrenic angles are sharp.")
_NO_PNEUMOTHORAX = ("No pneumothorax.", "There is no pneumothorax.", "No evidence of pneumothorax.")
_BONES = (
    "XXXX are intact.",
    "The osseous structures are intact.",
    "No acute bony abnormality.",
    "XXXX XXXX are intact.",
    "The visualized osseous structures are unremarkable.",
)
_OPENER = ("Frontal and lateral views of the chest.", "PA and lateral views of the chest were obtained.")
_TRACHEA = ("The trachea is midline.",)
_VASCULATURE = (
    "The pulmonary vasculature is normal.",
    "Pulmonary vascularity is within normal limits.",
    "No pulmonary edema.",
    "There is no evidence of pulmonary edema.",
)
_EXPANSION = ("The lungs are well expanded.", "Lung volumes are normal.")  # not with a pneumothorax

# Report length in words (numbers of numbered lists excluded): IU-like but on the short side (the
# sample must be learnable in minutes), and short enough that R2Gen's cleaned text (each period a
# token) plus BOS and EOS fits its max_seq_length of 60.
_MIN_WORDS, _MAX_WORDS, _MAX_TOKENS = 8, 45, 56


def _pick(rng: np.random.Generator, options: Sequence[str], **slots: str) -> str:
    """One phrasing: the first with probability 1/2, the rest equally likely; slots filled in."""
    k = 0 if rng.random() < 0.5 or len(options) == 1 else int(rng.integers(1, len(options)))
    capitalised = {key.capitalize(): value.capitalize() for key, value in slots.items()}
    return options[k].format(**slots, **capitalised)


def _length(sentences: list[str]) -> tuple[int, int]:
    """(words, tokens) of sentences as R2Gen's cleaning counts them: periods are tokens."""
    words = sum(len(re.findall(r"[A-Za-z][A-Za-z-]*", s)) for s in sentences)
    return words, words + sum(s.count(".") for s in sentences)


def write_report(findings: dict, rng: np.random.Generator) -> str:
    """An IU X-Ray style findings paragraph stating exactly what ``findings`` says is drawn.

    Order: heart, mediastinum, lungs, pleura, bones. Absent findings of the kinds we draw are
    negated explicitly ("No pleural effusion.", "No pneumothorax.", "The lungs are clear.").
    """
    consolidation, nodule = findings["consolidation"], findings["nodule"]
    effusion, pneumothorax = findings["effusion"], findings["pneumothorax"]

    cardiac = []
    if not findings["cardiomegaly"] and rng.random() < 0.2:
        cardiac.append(_pick(rng, _HEART_AND_MEDIASTINUM))
    else:
        cardiac.append(_pick(rng, _HEART_ENLARGED if findings["cardiomegaly"] else _HEART_NORMAL))
        if rng.random() < 0.25:
            cardiac.append(_pick(rng, _MEDIASTINUM))

    lungs = []
    if consolidation:
        lungs.append(_pick(rng, _CONSOLIDATION, **consolidation))
    elif nodule or effusion or pneumothorax:
        lungs.append(_pick(rng, _NO_CONSOLIDATION))
    else:
        lungs.append(_pick(rng, _LUNGS_CLEAR))
    if nodule:
        lungs.append(_pick(rng, _NODULE, **nodule))

    pleura = []
    if effusion:
        options = _EFFUSION + (_SMALL_EFFUSION_EXTRA if effusion["size"] == "small" else ())
        pleura.append(_pick(rng, options, **effusion))
    if pneumothorax:
        if not effusion:
            pleura.append(_pick(rng, _NO_EFFUSION))
        pleura.append(_pick(rng, _PNEUMOTHORAX, **pneumothorax))
    elif effusion:
        pleura.append(_pick(rng, _NO_PNEUMOTHORAX))
    else:
        pleura.append(_pick(rng, _NO_EFFUSION_OR_PNEUMOTHORAX))

    # Optional sentences, each drawn once; they make the length vary like real reports. They are
    # kept rare: every sentence that does not depend on the image dilutes the signal a small model
    # learns from, and the sample must be learnable within the pipeline's time budget.
    opener = [_pick(rng, _OPENER)] if rng.random() < 0.03 else []
    trachea = [_pick(rng, _TRACHEA)] if rng.random() < 0.05 else []
    vessels = [_pick(rng, _VASCULATURE)] if rng.random() < 0.1 else []
    expansion = [_pick(rng, _EXPANSION)] if rng.random() < 0.05 and not pneumothorax else []
    bones = [_pick(rng, _BONES)] if rng.random() < 0.35 else []

    def assemble() -> list[str]:
        return opener + cardiac + trachea + vessels + expansion + lungs + pleura + bones

    for extra, options in ((bones, _BONES), (vessels, _VASCULATURE), (trachea, _TRACHEA)):
        if _length(assemble())[0] < _MIN_WORDS and not extra:
            extra.append(_pick(rng, options))
    for extra in (opener, expansion, trachea, vessels, bones):
        words, tokens = _length(assemble())
        if words > _MAX_WORDS or tokens > _MAX_TOKENS:
            extra.clear()
    sentences = assemble()

    # Formatting quirks of the real reports: numbered sentences, a doubled final period.
    quirk = rng.random()
    if quirk < 0.08 and len(sentences) <= 5:
        return " ".join(f"{i}. {s}" for i, s in enumerate(sentences, start=1))
    text = " ".join(sentences)
    return text + "." if quirk > 0.97 else text


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


def _study_ids(rng: np.random.Generator, studies: int, layout: str) -> list[dict]:
    """Unique identifiers shaped like the real datasets' ones."""
    if layout == "iu_xray":
        numbers = rng.choice(np.arange(1, max(4000, 2 * studies)), size=studies, replace=False)
        images = rng.integers(1, 3000, size=studies)
        return [{"id": f"CXR{num}_IM-{img:04d}"} for num, img in zip(numbers, images)]
    subjects = rng.choice(np.arange(10_000_000, 11_000_000), size=studies, replace=False)
    study_numbers = rng.choice(np.arange(50_000_000, 60_000_000), size=studies, replace=False)
    ids = []
    for subject, study in zip(subjects, study_numbers):
        dicom = "-".join(f"{int(x):08x}" for x in rng.integers(0, 2**32, size=5))
        ids.append({"id": dicom, "study_id": int(study), "subject_id": int(subject)})
    return ids


def _split_counts(studies: int, fractions: Sequence[float]) -> list[int]:
    """Studies per split: proportional, at least one each, summing to ``studies``."""
    val = max(1, round(studies * fractions[1]))
    test = max(1, round(studies * fractions[2]))
    return [studies - val - test, val, test]


def _check_args(out_dir: Path, studies: int, seed: int, layout: str, image_size: int,
                split_fractions: Sequence[float]) -> None:
    if layout not in LAYOUTS:
        raise R2GenError(f"unknown sample layout {layout!r}: must be one of {', '.join(LAYOUTS)}")
    if studies < 3:
        raise R2GenError(f"--studies {studies} is too small: need at least 3 so that train, val and test are non-empty")
    if seed < 0:
        raise R2GenError(f"--seed {seed} must be a non-negative integer")
    if image_size < 32:
        raise R2GenError(f"--image-size {image_size} is too small: use at least 32 px (the sample uses 128)")
    if len(split_fractions) != 3 or min(split_fractions) <= 0 or abs(sum(split_fractions) - 1.0) > 1e-6:
        raise R2GenError(f"split fractions {tuple(split_fractions)} must be three positive numbers summing to 1")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "findings.json").exists():
        raise R2GenError(
            f"refusing to replace {out_dir}: it is not empty and holds no synthetic sample (no findings.json); "
            "choose a new or empty directory"
        )


def generate_sample(out_dir: str | Path, studies: int, seed: int, layout: str = "iu_xray",
                    image_size: int = 128, split_fractions: Sequence[float] = (0.7, 0.1, 0.2)) -> dict:
    """Write a synthetic dataset in R2Gen's layout to ``out_dir`` (atomically replaced).

    Writes ``annotation.json`` (``{"train"|"val"|"test": [{"id", "report", "image_path", "split"}]}``,
    MIMIC entries also carry ``study_id`` and ``subject_id`` and write ``___`` where IU writes
    ``XXXX``), the images under ``images/`` and
    ``findings.json`` (``{id: findings}``, the ground truth behind each report).

    Returns:
        A summary: layout, studies, counts per split and per finding, normal studies, number of
        images and bytes written.

    Raises:
        R2GenError: a bad argument, or ``out_dir`` holds something other than a previous sample.
    """
    out_dir = Path(out_dir)
    _check_args(out_dir, studies, seed, layout, image_size, split_fractions)
    rng = np.random.default_rng(seed)
    order = rng.permutation(studies)  # drawn first: both layouts put study i in the same split
    ids = _study_ids(rng, studies, layout)
    counts = _split_counts(studies, split_fractions)
    split_of = np.empty(studies, dtype=object)
    split_of[order[: counts[0]]] = "train"
    split_of[order[counts[0]: counts[0] + counts[1]]] = "val"
    split_of[order[counts[0] + counts[1]:]] = "test"

    annotation: dict[str, list] = {split: [] for split in SPLITS}
    truth: dict[str, dict] = {}
    with atomic_dir(out_dir) as tmp:
        for index, ident in enumerate(ids):
            # Separate streams, so that findings and reports do not depend on the image size.
            findings = sample_findings(np.random.default_rng([seed, index, 0]))
            views = draw_study(findings, np.random.default_rng([seed, index, 1]), image_size)
            report = write_report(findings, np.random.default_rng([seed, index, 2]))
            if layout == "iu_xray":
                paths = [f"{ident['id']}/{k}.png" for k in range(2)]
                for path, view in zip(paths, views):
                    _save(tmp / "images" / path, view)
            else:
                subject = f"p{ident['subject_id']}"
                paths = [f"{subject[:3]}/{subject}/s{ident['study_id']}/{ident['id']}.jpg"]
                _save(tmp / "images" / paths[0], views[0])
                report = report.replace("XXXX", "___")  # MIMIC-CXR's de-identification mark
            split = str(split_of[index])
            annotation[split].append({**ident, "report": report, "image_path": paths, "split": split})
            truth[ident["id"]] = findings
        write_json(tmp / "annotation.json", annotation)
        write_json(tmp / "findings.json", truth)
        written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        images = sum(1 for p in (tmp / "images").rglob("*") if p.is_file())

    return {
        "out_dir": str(out_dir),
        "layout": layout,
        "studies": studies,
        "splits": {split: len(annotation[split]) for split in SPLITS},
        "findings": {kind: sum(1 for f in truth.values() if f[kind]) for kind in FINDINGS},
        "normal": sum(1 for f in truth.values() if is_normal(f)),
        "images": images,
        "bytes": written,
    }


def _save(path: Path, image: np.ndarray) -> None:
    """8-bit grayscale PNG (fixed zlib level) or JPEG (fixed quality): same pixels, same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(image)
    if path.suffix == ".png":
        picture.save(path, format="PNG", compress_level=9)
    else:
        picture.save(path, format="JPEG", quality=90)

