"""Synthetic face-mask data: drawn faces with masks worn right, wrong or not at all.

Each image is a textured background (gradients, stripes, blotchy noise, random
shapes, drawn shoulders) with 1 to 6 cartoon faces (skin tones, hair, ears, eyes,
eyebrows, nose, mouth). The class is decided by what the mask covers:

* ``with_mask``: nose and mouth covered,
* ``mask_weared_incorrect``: nose visible, mask over mouth and chin or only the chin,
* ``without_mask``: no mask.

Faces are drawn at 4x on their own transparent patch, turned by a small angle,
shaded and shrunk (anti-aliasing), then composited; the VOC box is the bounding
box of the patch's opaque pixels, so boxes are tight and always inside the image.
Telling ``with_mask`` from ``mask_weared_incorrect`` on a 15 px face hinges on a
few nose pixels, which keeps the task learnable but not trivial.

Every image draws from its own numpy Generator seeded by (seed, index), so a
dataset is deterministic for a seed and the first N images do not depend on how
many are made.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .. import defaults as D
from ..classes import CLASSES
from ..errors import InputError
from .voc import VocAnnotation, VocObject, write_voc

# Class mix per face: with_mask, without_mask, mask_weared_incorrect. The real data is
# about 81/16/3; the rare class is made less rare here so that small samples contain it.
CLASS_PROBABILITIES = {"with_mask": 0.45, "without_mask": 0.35, "mask_weared_incorrect": 0.20}

SKIN_TONES = [(255, 224, 196), (241, 194, 158), (224, 172, 132), (198, 134, 96), (170, 110, 72),
              (141, 85, 54), (110, 66, 42), (255, 205, 170), (230, 190, 150), (92, 56, 38)]
HAIR_COLOURS = [(20, 15, 12), (60, 40, 25), (110, 70, 35), (180, 140, 80), (220, 200, 150),
                (140, 140, 140), (90, 30, 20), (35, 30, 40)]
MASK_COLOURS = [(150, 200, 235), (235, 238, 240), (35, 35, 40), (240, 170, 190), (40, 55, 110),
                (120, 195, 170), (160, 160, 165), (200, 60, 60), (250, 220, 90)]
CLOTHES_COLOURS = [(30, 60, 120), (150, 30, 40), (40, 110, 60), (220, 220, 215), (25, 25, 30),
                   (200, 140, 60), (110, 80, 140), (90, 90, 95), (60, 150, 170)]

SUPERSAMPLE = 4  # faces are drawn at 4x and shrunk, for smooth edges
REFERENCE_SIZE = (320, 240)  # face sizes below are for this image size and scale with it
FACE_HEIGHT_PX = (15.0, 80.0)
MIN_FACE_HEIGHT_PX = 10.0  # below this a face is a blob even for a person


def _jitter(colour, rng, amount: float = 12.0):
    return tuple(int(np.clip(c + rng.normal(0, amount), 0, 255)) for c in colour)


def _pick(palette, rng):
    return palette[int(rng.integers(len(palette)))]


def _shade(colour, factor: float):
    return tuple(int(np.clip(c * factor, 0, 255)) for c in colour)


# ---------------------------------------------------------------------------------------------
# Backgrounds

def _gradient(rng, width, height):
    c0 = rng.uniform(0, 255, 3)
    c1 = rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    t = xs * math.cos(angle) + ys * math.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    return c0 * (1 - t[..., None]) + c1 * t[..., None]


def _stripes(rng, width, height):
    c0 = rng.uniform(0, 255, 3)
    c1 = rng.uniform(0, 255, 3)
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(6, 40) * max(width, height) / REFERENCE_SIZE[0]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = (xs * math.cos(angle) + ys * math.sin(angle)) * 2 * math.pi / period
    t = 0.5 + 0.5 * np.sin(phase)
    if rng.random() < 0.5:
        t = (t > 0.5).astype(np.float32)  # hard-edged stripes
    return c0 * (1 - t[..., None]) + c1 * t[..., None]


def _blotches(rng, width, height):
    # Low-frequency colour noise: a few random pixels blown up smoothly.
    cells = (int(rng.integers(2, 7)), int(rng.integers(2, 7)))
    small = rng.uniform(0, 255, (cells[1], cells[0], 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.float32)


def _background(rng, width, height) -> Image.Image:
    kind = rng.choice(["gradient", "stripes", "blotches"], p=[0.35, 0.3, 0.35])
    base = {"gradient": _gradient, "stripes": _stripes, "blotches": _blotches}[kind](rng, width, height)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    scale = max(width, height) / REFERENCE_SIZE[0]
    # Random shapes, some in skin or mask colours, so that colour alone does not find faces.
    for _ in range(int(rng.integers(2, 12))):
        palette = [SKIN_TONES, MASK_COLOURS, CLOTHES_COLOURS, None][int(rng.integers(4))]
        colour = _jitter(_pick(palette, rng), rng) if palette else tuple(int(v) for v in rng.integers(0, 256, 3))
        x0, y0 = rng.uniform(-0.1, 1.0) * width, rng.uniform(-0.1, 1.0) * height
        w, h = rng.uniform(5, 90) * scale, rng.uniform(5, 90) * scale
        shape = int(rng.integers(4))
        if shape == 0:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
        elif shape == 1:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
        elif shape == 2:
            points = [(x0 + rng.uniform(0, w), y0 + rng.uniform(0, h)) for _ in range(int(rng.integers(3, 6)))]
            draw.polygon(points, fill=colour)
        else:
            draw.line([x0, y0, x0 + w, y0 + h], fill=colour, width=max(1, int(rng.uniform(1, 6) * scale)))
    return image


# ---------------------------------------------------------------------------------------------
# Faces

def _face_patch(rng, face_height_px: float, label: str):
    """Draw one head on a transparent RGBA patch, about face_height_px tall once shrunk.

    Returns the shrunk, turned patch. Geometry is in "head units": the head is 1 tall,
    centred on (0, 0), y pointing down.
    """
    ss = SUPERSAMPLE
    unit = face_height_px * ss  # pixels per head unit at drawing resolution
    size = int(math.ceil(unit * 1.5))
    patch = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(patch)
    cx = cy = size / 2.0

    def px(x, y):
        return (cx + x * unit, cy + y * unit)

    def box(x0, y0, x1, y1):
        (a, b), (c, d) = px(x0, y0), px(x1, y1)
        return [min(a, c), min(b, d), max(a, c), max(b, d)]

    line = max(1, int(round(0.025 * unit)))
    half_w = rng.uniform(0.36, 0.43)
    skin = _jitter(_pick(SKIN_TONES, rng), rng, 8)
    skin_dark = _shade(skin, 0.8)
    hair = _jitter(_pick(HAIR_COLOURS, rng), rng, 10)
    hair_style = rng.choice(["none", "short", "long", "cap"], p=[0.15, 0.45, 0.3, 0.1])

    if hair_style == "long":  # behind the head, down to the jaw
        draw.rounded_rectangle(box(-half_w - 0.06, -0.52, half_w + 0.06, 0.42), radius=0.2 * unit, fill=hair)
    # Ears, then the face on top of them.
    for side in (-1, 1):
        draw.ellipse(box(side * (half_w - 0.04), -0.1, side * (half_w + 0.06), 0.12), fill=skin_dark)
    draw.ellipse(box(-half_w, -0.5, half_w, 0.5), fill=skin)
    if hair_style in ("short", "long"):
        draw.chord(box(-half_w - 0.02, -0.54, half_w + 0.02, 0.05), 180, 360, fill=hair)
        draw.chord(box(-half_w + 0.02, -0.42, half_w - 0.02, -0.05), 180, 360, fill=skin)
        # A fringe of varied depth, drawn as an ellipse cap over the forehead.
        fringe = rng.uniform(-0.34, -0.24)
        draw.chord(box(-half_w + 0.02, -0.5, half_w - 0.02, fringe + 0.08), 180, 360, fill=hair)
    elif hair_style == "cap":
        cap = _jitter(_pick(CLOTHES_COLOURS, rng), rng)
        draw.chord(box(-half_w - 0.03, -0.56, half_w + 0.03, -0.05), 180, 360, fill=cap)
        draw.rectangle(box(-half_w - 0.03, -0.3, half_w + 0.12, -0.25), fill=_shade(cap, 0.8))

    # Eyes and eyebrows.
    eye_y = rng.uniform(-0.13, -0.07)
    eye_dx = rng.uniform(0.13, 0.17)
    iris = _jitter(_pick([(60, 40, 20), (40, 90, 140), (70, 110, 60), (25, 20, 20)], rng), rng, 6)
    look = rng.uniform(-0.015, 0.015)
    for side in (-1, 1):
        ex = side * eye_dx
        draw.ellipse(box(ex - 0.07, eye_y - 0.04, ex + 0.07, eye_y + 0.04), fill=(245, 245, 240))
        draw.ellipse(box(ex + look - 0.033, eye_y - 0.033, ex + look + 0.033, eye_y + 0.033), fill=iris)
        draw.ellipse(box(ex + look - 0.014, eye_y - 0.014, ex + look + 0.014, eye_y + 0.014), fill=(10, 10, 10))
        brow_y = eye_y - rng.uniform(0.08, 0.11)
        draw.line([px(ex - 0.08, brow_y + 0.01), px(ex + 0.08, brow_y - 0.01 * side)],
                  fill=_shade(hair, 0.9), width=max(1, int(1.6 * line)))

    # Nose: a darker wedge with nostrils; its visibility is what separates the mask classes.
    nose_top, nose_bottom = eye_y + 0.05, rng.uniform(0.1, 0.14)
    nose_half = rng.uniform(0.045, 0.065)
    draw.polygon([px(0, nose_top), px(-nose_half, nose_bottom), px(nose_half, nose_bottom)], fill=skin_dark)
    for side in (-1, 1):
        draw.ellipse(box(side * 0.035 - 0.018, nose_bottom - 0.02, side * 0.035 + 0.018, nose_bottom + 0.005),
                     fill=_shade(skin, 0.55))

    # Mouth: closed smile, flat line or open.
    mouth_y = rng.uniform(0.24, 0.29)
    mouth_half = rng.uniform(0.09, 0.14)
    lips = _jitter((170, 60, 60), rng, 15)
    style = int(rng.integers(3))
    if style == 0:
        draw.arc(box(-mouth_half, mouth_y - 0.08, mouth_half, mouth_y + 0.04), 20, 160, fill=lips, width=2 * line)
    elif style == 1:
        draw.line([px(-mouth_half, mouth_y), px(mouth_half, mouth_y)], fill=lips, width=2 * line)
    else:
        draw.ellipse(box(-mouth_half * 0.7, mouth_y - 0.035, mouth_half * 0.7, mouth_y + 0.045), fill=(90, 20, 25))
        draw.ellipse(box(-mouth_half * 0.7, mouth_y - 0.035, mouth_half * 0.7, mouth_y + 0.0), fill=lips)

    # The mask draws from its own stream, so that one face with and without a mask differs only there.
    mask_rng = np.random.default_rng(int(rng.integers(2**63)))
    if label != "without_mask":
        _draw_mask(draw, mask_rng, px, box, half_w, nose_top, nose_bottom, mouth_y, label, line)

    # Turn, shade and shrink.
    angle = rng.uniform(-15, 15)
    patch = patch.rotate(angle, resample=Image.BICUBIC, expand=True)
    light = rng.uniform(0.7, 1.15)
    if abs(light - 1.0) > 0.02:
        rgb, alpha = patch.convert("RGB"), patch.getchannel("A")
        rgb = Image.fromarray(np.clip(np.asarray(rgb, dtype=np.float32) * light, 0, 255).astype(np.uint8))
        patch = rgb.convert("RGBA")
        patch.putalpha(alpha)
    small = (max(1, round(patch.width / ss)), max(1, round(patch.height / ss)))
    return patch.resize(small, Image.LANCZOS)


def _draw_mask(draw, rng, px, box, half_w, nose_top, nose_bottom, mouth_y, label, line):
    colour = _jitter(_pick(MASK_COLOURS, rng), rng, 8)
    edge = _shade(colour, 0.75)
    if label == "with_mask":
        top = nose_top + rng.uniform(0.02, 0.07)  # over the bridge of the nose
    elif rng.random() < 0.6:
        top = nose_bottom + rng.uniform(0.02, 0.05)  # under the nose, over the mouth
    else:
        top = mouth_y + rng.uniform(0.06, 0.09)  # only the chin
    bottom = rng.uniform(0.47, 0.53)
    side = half_w + rng.uniform(0.0, 0.03)
    points = [px(-side, top + 0.03), px(-0.12, top), px(0.0, top - 0.01), px(0.12, top), px(side, top + 0.03),
              px(side - 0.05, bottom - 0.12), px(0.12, bottom), px(-0.12, bottom), px(-side + 0.05, bottom - 0.12)]
    draw.polygon(points, fill=colour, outline=edge)
    # Straps to the ears and pleats, as on surgical masks.
    for s in (-1, 1):
        draw.line([px(s * side, top + 0.04), px(s * (half_w + 0.02), -0.02)], fill=edge, width=line)
    pleats = int(rng.integers(0, 4))
    for k in range(pleats):
        y = top + (bottom - top) * (k + 1) / (pleats + 1)
        draw.line([px(-side + 0.06, y), px(side - 0.06, y)], fill=edge, width=line)
    if rng.random() < 0.2:  # patterned fabric
        dots = _shade(colour, 1.3) if sum(colour) < 300 else _shade(colour, 0.6)
        for _ in range(8):
            x, y = rng.uniform(-side + 0.08, side - 0.08), rng.uniform(top + 0.04, bottom - 0.06)
            draw.ellipse(box(x - 0.02, y - 0.02, x + 0.02, y + 0.02), fill=dots)


def _shoulders(draw, rng, x_centre, y_chin, face_height):
    colour = _jitter(_pick(CLOTHES_COLOURS, rng), rng)
    half = face_height * rng.uniform(0.9, 1.3)
    top = y_chin + face_height * rng.uniform(0.05, 0.2)
    draw.ellipse([x_centre - half, top, x_centre + half, top + 2.2 * face_height], fill=colour)


def _overlaps_too_much(box, placed) -> bool:
    for other in placed:
        ix = min(box[2], other[2]) - max(box[0], other[0])
        iy = min(box[3], other[3]) - max(box[1], other[1])
        if ix > 0 and iy > 0:
            inter = ix * iy
            smaller = min((box[2] - box[0]) * (box[3] - box[1]), (other[2] - other[0]) * (other[3] - other[1]))
            if inter > 0.15 * smaller:  # slight overlap only: boxes must stay identifiable
                return True
    return False


def render_sample(rng: np.random.Generator, image_size=D.SAMPLE_IMAGE_SIZE, min_faces: int = D.SAMPLE_FACES[0],
                  max_faces: int = D.SAMPLE_FACES[1]):
    """Draw one image; return (PIL RGB image, list of VocObject)."""
    width, height = image_size
    scale = min(width / REFERENCE_SIZE[0], height / REFERENCE_SIZE[1])
    low = max(MIN_FACE_HEIGHT_PX, FACE_HEIGHT_PX[0] * scale)
    high = max(low + 1.0, min(FACE_HEIGHT_PX[1] * scale, 0.8 * height))
    image = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    num_faces = int(rng.integers(min_faces, max_faces + 1))
    # Log-uniform sizes, drawn far-to-near (small first) so that near faces overlap far ones.
    heights = sorted(float(np.exp(rng.uniform(math.log(low), math.log(high)))) for _ in range(num_faces))
    labels = rng.choice(list(CLASS_PROBABILITIES), size=num_faces, p=list(CLASS_PROBABILITIES.values()))
    objects, placed, faces = [], [], []
    for face_height, label in zip(heights, labels):
        patch = _face_patch(rng, face_height, str(label))
        alpha = patch.getchannel("A").point(lambda a: 255 if a >= 128 else 0)
        bbox = alpha.getbbox()
        if bbox is None:
            continue
        x0, y0, x1, y1 = bbox
        if x1 - x0 > width or y1 - y0 > height:
            continue
        for _attempt in range(30):
            ox = int(rng.integers(-x0, width - x1 + 1))
            oy = int(rng.integers(-y0, height - y1 + 1))
            face_box = (x0 + ox, y0 + oy, x1 + ox, y1 + oy)
            if not _overlaps_too_much(face_box, placed):
                break
        else:
            continue
        placed.append(face_box)
        faces.append((patch, (ox, oy)))
        objects.append(VocObject(str(label), *(float(v) for v in face_box)))
    # All shoulders before any face, so that no body ever hides an annotated face.
    for face_box in placed:
        if rng.random() < 0.7:
            _shoulders(draw, rng, (face_box[0] + face_box[2]) / 2, face_box[3], face_box[3] - face_box[1])
    for patch, offset in faces:
        image.paste(patch, offset, patch)
    # Sensor noise and occasional softness.
    pixels = np.asarray(image, dtype=np.float32)
    pixels += rng.normal(0, rng.uniform(1.5, 7.0), pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.25:
        image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.8))))
    return image, objects


def make_sample_dataset(out_dir, num_images: int, seed: int = D.SEED, image_size=D.SAMPLE_IMAGE_SIZE,
                        min_faces: int = D.SAMPLE_FACES[0], max_faces: int = D.SAMPLE_FACES[1],
                        prefix: str = "sample_") -> dict:
    """Write *num_images* synthetic images and VOC files under out_dir/images and out_dir/annotations.

    Files are drawn into a hidden temporary folder inside *out_dir* and moved into place
    when all are done (annotations first, images last; a missing images/ folder appears
    in one rename), so an interrupted run never leaves a half-made set behind. Generator
    files from an earlier run that this run does not make (<prefix><number>.jpg/.xml)
    are removed; other files are left alone. Returns a summary: images written, objects
    per class, folders.
    """
    if num_images < 1:
        raise InputError(f"num_images must be at least 1, got {num_images}")
    if not 1 <= min_faces <= max_faces:
        raise InputError(f"need 1 <= min_faces <= max_faces, got {min_faces} and {max_faces}")
    width, height = (int(v) for v in image_size)
    if width < 32 or height < 32:
        raise InputError(f"image size {width}x{height} is too small (minimum 32x32)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = Counter({name: 0 for name in CLASSES})
    digits = max(4, len(str(num_images - 1)))
    with tempfile.TemporaryDirectory(prefix=".sample-", dir=out_dir) as tmp:
        staged = {"images": Path(tmp) / "images", "annotations": Path(tmp) / "annotations"}
        for folder in staged.values():
            folder.mkdir()
        for index in range(num_images):
            rng = np.random.default_rng([int(seed), index])
            image, objects = render_sample(rng, (width, height), min_faces, max_faces)
            stem = f"{prefix}{index:0{digits}d}"
            image.save(staged["images"] / f"{stem}.jpg", format="JPEG", quality=int(rng.integers(80, 96)))
            write_voc(staged["annotations"] / f"{stem}.xml",
                      VocAnnotation(filename=f"{stem}.jpg", width=width, height=height, depth=3, objects=objects))
            counts.update(o.name for o in objects)
        own_name = re.compile(rf"^{re.escape(prefix)}\d+\.(jpg|xml)$")
        for kind in ("annotations", "images"):
            _move_into_place(staged[kind], out_dir / kind, own_name)
    return {"images": num_images, "objects": dict(counts), "images_dir": str(out_dir / "images"),
            "annotations_dir": str(out_dir / "annotations"), "seed": int(seed), "image_size": [width, height]}


def _move_into_place(staged: Path, target: Path, own_name) -> None:
    if not target.exists():
        os.replace(staged, target)
        return
    new_names = {p.name for p in staged.iterdir()}
    for path in sorted(staged.iterdir()):
        os.replace(path, target / path.name)
    for path in target.iterdir():
        if path.is_file() and own_name.match(path.name) and path.name not in new_names:
            path.unlink()
