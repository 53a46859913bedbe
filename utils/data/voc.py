"""Pascal VOC XML: parsing (lxml), writing, and box cleaning.

Parsing is strict about what a detector needs (size and, per object, a name and
a numeric bndbox) and every failure is a VocError naming the file and the
problem, so that jobs can report it instead of showing an lxml traceback.

parse_voc is also the one place where a label map (utils.classes.LabelMap, the jobs'
--label-map) turns another data set's object names into this project's classes;
the objects carry the canonical name, so everything written from them (to_xml_bytes)
holds canonical names too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from lxml import etree

from .. import defaults as D
from ..atomic import write_bytes
from ..classes import NO_LABEL_MAP, LabelMap
from ..errors import InputError

CLIP_TOLERANCE_PX = D.VOC_CLIP_TOLERANCE_PX  # a box overshooting the image by at most this is clipped


class VocError(InputError):
    """An annotation file that cannot be used; str() names the file and the problem."""

    def __init__(self, file, problem: str):
        self.file = str(file)
        self.problem = problem
        super().__init__(f"{self.file}: {problem}")


@dataclass(frozen=True)
class VocObject:
    name: str
    xmin: float
    ymin: float
    xmax: float
    ymax: float
    difficult: int = 0
    truncated: int = 0
    pose: str = "Unspecified"
    # The name in the XML file when a label map renamed it (for the validation report); not part of equality,
    # so an object reads back equal from the canonical file it was written to.
    source_name: str | None = field(default=None, compare=False)

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (self.xmin, self.ymin, self.xmax, self.ymax)

    @property
    def area(self) -> float:
        return max(0.0, self.xmax - self.xmin) * max(0.0, self.ymax - self.ymin)


@dataclass
class VocAnnotation:
    filename: str
    width: int | None  # None: the file has no usable <size> (size_problem says why)
    height: int | None
    depth: int = 3
    objects: list[VocObject] = field(default_factory=list)
    folder: str = "images"
    path: str | None = None
    # The file's <!DOCTYPE ...> ("" when none): never read here (_PARSER), but a copy would hand it, and any
    # SYSTEM entity it names, to the next tool that reads the file; not part of equality
    doctype: str = field(default="", compare=False)
    # Why width and height are None ("no <size> in the XML", "<size> 0x0 in the XML is not positive"): the image's
    # own size stands in, and validation and preprocess say so; None when the <size> was read
    size_problem: str | None = field(default=None, compare=False)


# A parser that never fetches entities or DTDs: annotation files come from outside.
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)


def _text(element, tag: str, file, required: bool = True, where: str = ""):
    child = element.find(tag)
    if child is not None and (entities := [node.text for node in child if isinstance(node, etree._Entity)]):
        # not expanded (_PARSER): the field would read as missing or as part of its text
        raise VocError(file, f"field <{tag}>{where} holds the entity reference {entities[0]}; entities are not "
                             "expanded here: write the value itself")
    if child is None or child.text is None or not child.text.strip():
        if required:
            raise VocError(file, f"missing required field <{tag}>{where}")
        return None
    return child.text.strip()


def _flag(element, tag: str, file) -> int:
    """A 0/1 flag such as <difficult>; absent or unreadable counts as 0, as in the VOC tools."""
    raw = _text(element, tag, file, required=False)
    try:
        return int(float(raw)) if raw else 0
    except ValueError:
        return 0


def _number(element, tag: str, file, where: str = "") -> float:
    raw = _text(element, tag, file, where=where)
    try:
        value = float(raw)
    except ValueError:
        raise VocError(file, f"field <{tag}>{where} is not a number: {raw!r}") from None
    if not math.isfinite(value):
        raise VocError(file, f"field <{tag}>{where} is not finite: {raw!r}")
    return value


def parse_voc(path, label_map: LabelMap = NO_LABEL_MAP) -> VocAnnotation:
    """Parse one VOC file, object names mapped through *label_map*. Raises VocError for unreadable,
    malformed or incomplete XML."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise VocError(path, f"cannot read file ({exc.strerror or exc})") from None
    if not data.strip():
        raise VocError(path, "file is empty")
    try:
        root = etree.fromstring(data, parser=_PARSER)
    except etree.XMLSyntaxError as exc:
        raise VocError(path, f"XML is not well-formed ({exc.msg}, line {exc.lineno})") from None
    if root.tag != "annotation":
        raise VocError(path, f"root element is <{root.tag}>, expected <annotation>")
    filename = _text(root, "filename", path, required=False) or ""
    size = root.find("size")
    # No <size>, as often in real sets, or a 0x0 one, as some converters write: the image's own size stands in
    # (validation and preprocess say so), as it does for a <size> that disagrees with the image.
    width = height = None
    size_problem, depth = "no <size> in the XML", 3
    if size is not None:
        width = _number(size, "width", path, " in <size>")
        height = _number(size, "height", path, " in <size>")
        depth_raw = _text(size, "depth", path, required=False)
        try:
            depth = int(float(depth_raw)) if depth_raw else 3
        except ValueError:
            depth = 3
        size_problem = None
        if width < 1 or height < 1:
            size_problem = f"<size> {width:g}x{height:g} in the XML is not positive"
            width = height = None
    objects = []
    for index, obj in enumerate(root.iter("object")):
        where = f" in object {index}"
        name = _text(obj, "name", path, where=where)
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise VocError(path, f"missing required field <bndbox>{where} ({name})")
        coords = [_number(bndbox, tag, path, f"{where} ({name})") for tag in ("xmin", "ymin", "xmax", "ymax")]
        difficult, truncated = _flag(obj, "difficult", path), _flag(obj, "truncated", path)
        pose = _text(obj, "pose", path, required=False) or "Unspecified"
        class_name = label_map.class_name(name)  # every field read: the name as a class
        objects.append(VocObject(class_name, *coords, difficult=difficult, truncated=truncated, pose=pose,
                                 source_name=name if class_name != name else None))
    return VocAnnotation(filename=filename, width=None if width is None else int(round(width)),
                         height=None if height is None else int(round(height)), depth=depth,
                         objects=objects, folder=_text(root, "folder", path, required=False) or "images",
                         path=_text(root, "path", path, required=False),
                         doctype=root.getroottree().docinfo.doctype or "", size_problem=size_problem)


def to_xml_bytes(ann: VocAnnotation) -> bytes:
    root = etree.Element("annotation")
    etree.SubElement(root, "folder").text = ann.folder
    etree.SubElement(root, "filename").text = ann.filename
    if ann.path:
        etree.SubElement(root, "path").text = ann.path
    size = etree.SubElement(root, "size")
    etree.SubElement(size, "width").text = str(int(ann.width))
    etree.SubElement(size, "height").text = str(int(ann.height))
    etree.SubElement(size, "depth").text = str(int(ann.depth))
    etree.SubElement(root, "segmented").text = "0"
    for obj in ann.objects:
        element = etree.SubElement(root, "object")
        etree.SubElement(element, "name").text = obj.name
        etree.SubElement(element, "pose").text = obj.pose
        etree.SubElement(element, "truncated").text = str(int(obj.truncated))
        etree.SubElement(element, "occluded").text = "0"
        etree.SubElement(element, "difficult").text = str(int(obj.difficult))
        box = etree.SubElement(element, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), obj.box):
            # Integers when exact keep files identical to hand-made VOC; else 2 decimals.
            etree.SubElement(box, tag).text = str(int(value)) if float(value).is_integer() else f"{value:.2f}"
    return etree.tostring(root, pretty_print=True, xml_declaration=False, encoding="utf-8")


def write_voc(path, ann: VocAnnotation) -> Path:
    """Write *ann* atomically to *path*."""
    return write_bytes(path, to_xml_bytes(ann))


def clean_objects(ann: VocAnnotation, width: int | None = None, height: int | None = None,
                  known_classes=None, tolerance: float = CLIP_TOLERANCE_PX):
    """Return (kept objects, problems) for the objects of *ann* against an image of width x height.

    Unknown class names, zero- or negative-area boxes and boxes overshooting the image
    by more than *tolerance* px are dropped; smaller overshoots are clipped. Every drop
    and clip gives one problem string, so nothing disappears unreported.
    """
    width = ann.width if width is None else width
    height = ann.height if height is None else height
    kept, problems = [], []
    for index, obj in enumerate(ann.objects):
        label = f"object {index} ({obj.name})"
        if known_classes is not None and obj.name not in known_classes:
            problems.append(f"{label}: unknown class name {obj.name!r}, object dropped "
                            f"(known: {', '.join(known_classes)})")
            continue
        if obj.xmax <= obj.xmin or obj.ymax <= obj.ymin:
            problems.append(f"{label}: zero or negative area box {_fmt(obj.box)}, object dropped")
            continue
        overshoot = max(-obj.xmin, -obj.ymin, obj.xmax - width, obj.ymax - height)
        if overshoot > tolerance:
            problems.append(f"{label}: box {_fmt(obj.box)} lies outside the {width}x{height} image by "
                            f"{overshoot:g} px (> {tolerance:g} px), object dropped")
            continue
        if overshoot > 0:
            clipped = replace(obj, xmin=max(0.0, obj.xmin), ymin=max(0.0, obj.ymin),
                              xmax=min(float(width), obj.xmax), ymax=min(float(height), obj.ymax))
            if clipped.xmax <= clipped.xmin or clipped.ymax <= clipped.ymin:
                problems.append(f"{label}: box {_fmt(obj.box)} has no area inside the image, object dropped")
                continue
            problems.append(f"{label}: box {_fmt(obj.box)} overshoots the image by {overshoot:g} px, clipped")
            obj = clipped
        kept.append(obj)
    return kept, problems


# Where each EXIF orientation's turn (PIL's ImageOps.exif_transpose) moves the stored pixel (x, y) of a W x H
# image; the turns of 5-8 swap width and height.
_ORIENTED = {
    2: lambda x, y, w, h: (w - x, y), 3: lambda x, y, w, h: (w - x, h - y), 4: lambda x, y, w, h: (x, h - y),
    5: lambda x, y, w, h: (y, x), 6: lambda x, y, w, h: (h - y, x), 7: lambda x, y, w, h: (h - y, w - x),
    8: lambda x, y, w, h: (y, w - x),
}


def boxes_on_stored_pixels(ann: VocAnnotation, orientation: int, stored_size) -> str | None:
    """Why *ann*'s boxes are on the image's stored pixels, before its EXIF *orientation* turns them, or None.

    Only a turn that swaps width and height (orientations 5-8) of a non-square image leaves a trace: an XML <size>
    that is the stored size, not the displayed one (an annotation tool that ignores EXIF, as LabelImg does)."""
    width, height = stored_size
    if orientation not in (5, 6, 7, 8) or width == height or (ann.width, ann.height) != (width, height):
        return None
    return (f"<size> {width}x{height} is the stored size of an image its EXIF orientation {orientation} turns to "
            f"{height}x{width}: the boxes were drawn on the stored pixels and are turned with them")


def turn_boxes(ann: VocAnnotation, orientation: int) -> VocAnnotation:
    """*ann* (boxes on the stored pixels, <size> the stored size) with its boxes where the EXIF *orientation*'s
    turn puts them, and the displayed size."""
    move, (w, h) = _ORIENTED.get(orientation), (ann.width, ann.height)
    if move is None:
        return ann
    objects = []
    for obj in ann.objects:
        if obj.xmax <= obj.xmin or obj.ymax <= obj.ymin:  # dropped by clean_objects as it stands
            objects.append(obj)
            continue
        (ax, ay), (bx, by) = move(obj.xmin, obj.ymin, w, h), move(obj.xmax, obj.ymax, w, h)
        objects.append(replace(obj, xmin=min(ax, bx), ymin=min(ay, by), xmax=max(ax, bx), ymax=max(ay, by)))
    width, height = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    return replace(ann, width=width, height=height, objects=objects)


def parse_voc_for_image(path, image, displayed_size=None, label_map: LabelMap = NO_LABEL_MAP
                        ) -> tuple[VocAnnotation, str | None]:
    """(parse_voc of *path*, with its boxes turned with *image*'s pixels when they were drawn on its stored ones;
    why they were turned, or None): the annotation as every reader of a raw pair sees it. *displayed_size*, the
    image's (width, height) when the caller has it, spares the header read where the <size> already matches."""
    from .images import stored_size_and_orientation

    ann = parse_voc(path, label_map)
    if displayed_size is not None and (ann.width, ann.height) == tuple(displayed_size):
        return ann, None  # boxes on the stored pixels of a turned image come with the stored size: not these
    stored_size, orientation = stored_size_and_orientation(image)
    turned = boxes_on_stored_pixels(ann, orientation, stored_size)
    return (turn_boxes(ann, orientation), turned) if turned else (ann, None)


def _fmt(box) -> str:
    return "(" + ", ".join(f"{v:g}" for v in box) + ")"
