"""The pieces of the run report page (html_report.py): its inline CSS, small HTML builders whose
arguments are already-escaped HTML unless named otherwise, and figures as data: URIs.

An image embedded here comes from a run folder, which anyone can hand to bin/report.py: its
header is checked against defaults.IMAGE_MAX_PIXELS before it is decoded (utils/data/images.py),
so a decompression bomb among the outputs is one line on the page, not gigabytes.
"""

from __future__ import annotations

import base64
import html
import io

from PIL import Image, UnidentifiedImageError

from .. import defaults as D
from ..data.images import ImageError, check_image_pixels
from ..errors import shown
from ..figures import BELOW_ONLY, KEPT_MASKED, NO_FACE_KEPT, one_decimal
from .values import mapping, num, text

# What embedding an image can raise for a file that is not a usable image: said on the page, not a crash.
IMAGE_READ_ERRORS = (OSError, UnidentifiedImageError, ImageError)

CSS = """
:root{--fg:#1c2230;--muted:#5d6676;--line:#e2e5eb;--bg:#f5f6f8;--card:#fff;--accent:#2a62c9;--bad:#b4362b;
--good:#1c7f52;--warn:#fff7e0;--warnline:#d99a00}
*{box-sizing:border-box}
body{margin:0;font:15px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
color:var(--fg);background:var(--bg)}
header{background:#1c2230;color:#fff;padding:20px 32px 18px}
header h1{margin:0;font-size:1.5rem;font-weight:650;letter-spacing:-.01em}
header p{margin:4px 0 0;color:#b9c1cf;font-size:.9rem}
nav{position:sticky;top:0;z-index:10;display:flex;gap:2px;overflow-x:auto;padding:0 24px;
background:rgba(255,255,255,.96);border-bottom:1px solid var(--line);box-shadow:0 1px 3px rgba(0,0,0,.04)}
nav a{padding:11px 12px;color:var(--muted);text-decoration:none;white-space:nowrap;font-weight:550;font-size:.92rem;
border-bottom:2px solid transparent}
nav a:hover{color:var(--accent);border-bottom-color:var(--accent)}
main{max-width:1280px;margin:0 auto;padding:4px 32px 64px}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:20px 26px 12px;
margin:22px 0;scroll-margin-top:58px}
h2{margin:0 0 14px;font-size:1.3rem;font-weight:650}
h3{margin:18px 0 8px;font-size:1rem;font-weight:650}
p{margin:6px 0 12px}
.muted{color:var(--muted)}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(175px,1fr));gap:12px;margin-bottom:16px}
.card{border:1px solid var(--line);border-radius:8px;padding:12px 14px;background:#fbfcfd}
.card .value{font-size:1.6rem;font-weight:650;font-variant-numeric:tabular-nums;line-height:1.2}
.card .label{color:var(--muted);font-size:.82rem}
.card .sub{color:var(--muted);font-size:.8rem}
.bad{color:var(--bad)}.good{color:var(--good)}
.table-wrap{overflow-x:auto}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;margin:6px 0 16px;font-size:.92rem}
th,td{padding:5px 12px;border-bottom:1px solid var(--line);text-align:right;vertical-align:top}
th:first-child,td:first-child{text-align:left}
thead th{font-size:.76rem;text-transform:uppercase;letter-spacing:.04em;color:var(--muted);font-weight:600}
td.text,th.text{text-align:left}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.84rem}
pre{background:#f3f4f7;border-radius:6px;padding:12px 14px;overflow:auto;max-height:460px}
.figures{display:grid;grid-template-columns:repeat(auto-fit,minmax(440px,1fr));gap:16px;margin:8px 0 16px}
.figures.single{grid-template-columns:minmax(0,780px)}
figure{margin:0;border:1px solid var(--line);border-radius:8px;padding:10px;background:#fff}
figure img{width:100%;height:auto;display:block}
figcaption{color:var(--muted);font-size:.84rem;margin-top:6px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:12px;margin:8px 0 16px}
.tile{border:1px solid var(--line);border-radius:8px;overflow:hidden;background:#fff}
.tile img{width:100%;aspect-ratio:4/3;object-fit:contain;display:block;background:#20252f}
.tile .caption{padding:6px 10px 8px;font-size:.8rem}
.tile .name{font-weight:600;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.pill{display:inline-block;padding:0 7px;border-radius:9px;font-size:.76rem;margin:2px 3px 0 0;background:#eef0f3}
.pill.err{background:#fbe4e1;color:var(--bad)}
.note{background:var(--warn);border-left:4px solid var(--warnline);border-radius:4px;padding:8px 12px;margin:8px 0 14px;
font-size:.9rem}
.odd{color:var(--bad);border-bottom:1px dotted var(--bad);cursor:help}
.bar{height:10px;background:var(--accent);border-radius:5px;min-width:2px}
td.barcell{width:38%;text-align:left}
footer{color:var(--muted);font-size:.8rem;text-align:center;padding:12px}
"""


# ----------------------------------------------------------------------------- small builders

def esc(value) -> str:
    return html.escape(str(value), quote=True)


ODD_CLASS = "odd"  # a value of the wrong type in a run file, shown as a marked n/a


def odd(value) -> str:
    """A marked "n/a" for a value that is not the number expected (the value itself, bounded and escaped, on hover)."""
    return f'<span class="{ODD_CLASS}" title="not a number in the run file: {esc(shown(value, 60))}">n/a</span>'


def _formatted(value, form) -> str:
    if value is None or value == "":
        return "n/a"
    found = num(value)
    return odd(value) if found is None else form(found)


def number(value, digits: int = 3) -> str:
    return _formatted(value, lambda found: f"{found:.{digits}f}")


def count(value) -> str:
    """A count: an integer as it is, a float as read; anything else a marked n/a."""
    return _formatted(value, lambda found: f"{found:.0f}" if found.is_integer() else f"{found:g}")


def points(value, signed: bool = True) -> str:
    return _formatted(value, lambda found: f"{found:+.1f} pts" if signed else f"{found:.1f} pts")


def run_with(evaluation) -> str:
    """' with flip TTA and box voting', ' with flip TTA', ' with box voting' or '': how evaluation.json says the
    model ran (each true when it says so, not when it holds no answer: a file from before the choice)."""
    ways = [name for key, name in (("tta", "flip TTA"), ("box_voting", "box voting")) if evaluation.get(key) is True]
    return f" with {' and '.join(ways)}" if ways else ""


def setting(value) -> str:
    """A parameter's value: floats to 4 significant digits, anything else as it is."""
    return f"{value:.4g}" if isinstance(value, float) else esc(text(value, shown(value)))


def percent(value) -> str:
    return _formatted(value, lambda found: f"{one_decimal(found)}%")  # as the printed lines and the service's page


def seconds_text(value) -> str:
    def form(found: float) -> str:
        if found < 60:
            return f"{found:.1f} s"
        minutes, secs = divmod(int(round(found)), 60)
        hours, minutes = divmod(minutes, 60)
        return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"

    return _formatted(value, form)


def note(text: str) -> str:
    return f'<div class="note">{text}</div>'


def table(headers, rows, text_columns=(0,), classes=None) -> str:
    """An HTML table; cells are already-escaped HTML. *text_columns* are left-aligned; *classes* gives
    columns (by index) another CSS class."""
    def css(i):
        name = (classes or {}).get(i) or ("text" if i in text_columns else "")
        return f' class="{name}"' if name else ""

    head = "".join(f"<th{css(i)}>{h}</th>" for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f"<td{css(i)}>{c}</td>" for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def interval(result) -> str:
    """'53.2% (95% interval 44.0&ndash;61.5%)' of a utils.detection.quantify estimate; without a figure or an
    interval, why not, as the printed line and the service's page say it ('no figure (no faces found)', '50.0% (one
    image: no interval)'), where the page said 'n/a' as for a file that holds none; 'n/a' for no estimate."""
    result = mapping(result)
    if "percent" not in result:
        return "n/a"
    if result["percent"] is None:
        return f"no figure ({esc(text(result.get('note'), 'no faces found'))})"
    if result.get("low") is None:
        return f"{percent(result['percent'])} ({esc(text(result.get('note'), 'no interval'))})"
    confidence = num(result.get("confidence", 0.95))
    level = "n/a" if confidence is None else f"{100 * confidence:.0f}"
    low, high = num(result.get("low")), num(result.get("high"))
    bounds = (f"{one_decimal(low)}&ndash;{one_decimal(high)}%" if low is not None and high is not None
              else f"{percent(result.get('low'))}&ndash;{percent(result.get('high'))}")
    return f"{percent(result['percent'])} ({level}% interval {bounds})"


def test_split_predicted(config: dict, shrunk=None) -> str:
    """Whether the prediction set's figure is the test set's where both are of the test split's photos (a run without
    --pred-images); '' for another prediction set. The same model on the same pixels gives the same figure: the val
    and test sets keep each photo's own pixels (utils/defaults.py PREPROCESS_FORMAT); a --max-size cap that shrank
    some of them (*shrunk*: the test set preprocess report's images_shrunk; None from a report without it), or
    --fold-ensemble's models for the prediction set, make the two differ."""
    if "pred_images" not in config or config["pred_images"]:
        return ""
    why = []
    max_size, shrunk = num(config.get("max_size")), num(shrunk)
    if max_size and shrunk != 0:  # a cap above every photo's size changes no pixel
        # an older preprocess report does not count them: the page cannot tell whether any photo was over the cap
        which = (f"the test set's copies of any of them over {max_size:g} px on their longer side were shrunk to it"
                 if shrunk is None else
                 f"{shrunk:g} of the test set's copies of them were shrunk to at most {max_size:g} px on their longer "
                 "side")
        why.append(f"{which} (--max-size), and the model may find a face more or fewer in those")
    if config.get("fold_ensemble"):
        why.append("the fold models' ensemble (--fold-ensemble) predicts them, not the final model, with the estimator "
                   "that stands in for an ensemble, which has no validation rates")
    if not why:
        return ('<p class="muted">The prediction set is the test split\'s photos: the same model on the same pixels '
                "as the test set above, hence the same figure.</p>")
    return ('<p class="muted">The prediction set is the test split\'s photos, but ' + "; and ".join(why)
            + ": the two figures can differ.</p>")


def estimate_paragraph(estimate, units: str, below: bool = False) -> str:
    """'<p>Estimate (cc, classify and count): <b>53.2% (95% interval ...)</b> over 24 images; cc instead of pacc2:
    ...</p>' of a utils.detection.quantify estimate resting on *units* (its method named in words as the estimate
    names it: a reader of the page need not know what pacc2 is); *below*: no face at the score threshold, so the
    figure is of the detections below it alone (as the printed line says, compliance.compliance_line)."""
    estimate = mapping(estimate)
    words = f", {text(estimate['estimator'])}" if estimate.get("estimator") else ""
    return (f"<p>Estimate ({esc(text(estimate.get('method')) + words)}): <b>{interval(estimate)}</b> over {units}"
            + (f"; {esc(text(estimate['fallback']))}" if estimate.get("fallback") else "")
            + (f"; {NO_FACE_KEPT}: {BELOW_ONLY}" if below else "") + ".</p>")


def video_paragraphs(name: str, summary) -> str:
    """A predict_video summary (*name*): the frames, the faces counted and the estimate over blocks of frames."""
    summary = mapping(summary)
    overall, estimate = mapping(summary.get("overall")), mapping(summary.get("estimate"))
    block = count(mapping(summary.get("resampling")).get("block_frames"))
    below = num(overall.get("faces")) == 0 and num(estimate.get("percent")) is not None
    return (f"<h3>Video <code>{esc(text(summary.get('source')))}</code> <span class=\"muted\">({esc(name)})</span></h3>"
            f"<p>{count(summary.get('frames_processed'))} of {count(summary.get('frames_read'))} frames processed: "
            f"{count(overall.get('faces'))} faces, <b>{percent(overall.get('percent_properly_masked'))}</b> "
            f"{KEPT_MASKED}, score threshold {number(summary.get('score_threshold'), 2)}.</p>"
            + estimate_paragraph(estimate, f"{count(estimate.get('units'))} blocks of {block} processed frame(s)",
                                 below))


VIDEOS_SHOWN = 12  # videos of --pred-videos shown with their paragraphs and plot; the next ones a row each
VIDEO_ROWS = 200   # ... in a table of at most this many rows; the rest counted


def video_row(name: str, summary) -> list[str]:
    """A row of the table of the videos past VIDEOS_SHOWN: the video_paragraphs' figures in cells."""
    summary = mapping(summary)
    overall = mapping(summary.get("overall"))
    return [f"<code>{esc(text(summary.get('source')))}</code> <span class=\"muted\">({esc(name)})</span>",
            count(summary.get("frames_processed")), count(overall.get("faces")),
            percent(overall.get("percent_properly_masked")), interval(summary.get("estimate"))]


def videos_part(videos: dict, plot) -> str:
    """predict_video's summaries (*videos*, by file name): the first VIDEOS_SHOWN with their paragraphs and plot
    (*plot*: the HTML of a summary name's plot), the next VIDEO_ROWS a row each, the rest counted. Every video's
    plot was embedded (~60 kB of the page each; the 1,000 recordings of a folder of --pred-videos, ~60 MB)."""
    names = list(videos)
    parts = [video_paragraphs(name, videos[name]) + plot(name) for name in names[:VIDEOS_SHOWN]]
    rows = [video_row(name, videos[name]) for name in names[VIDEOS_SHOWN:VIDEOS_SHOWN + VIDEO_ROWS]]
    if rows:
        parts.append(f"<h3>{len(names) - VIDEOS_SHOWN} more videos</h3><p class=\"muted\">Their figures; each "
                     "video's plot is its <code>compliance_over_time_&lt;tag&gt;.png</code> in the run's outputs.</p>"
                     + table(["video", "frames processed", "faces", KEPT_MASKED, "estimate (95% interval)"],
                             rows, (0, 4)))
    if (more := len(names) - VIDEOS_SHOWN - len(rows)) > 0:
        parts.append(note(f"And {more} more videos not listed: their <code>video_summary_&lt;tag&gt;.json</code> "
                          "in the run's outputs."))
    return "".join(parts)


INSIDE = {True: "yes", False: "<b>no</b>"}


def estimates_table(quantification) -> str:
    """The compliance estimators on the test set against the truth (evaluation.json's quantification)."""
    quantification, rows = mapping(quantification), []
    for method, result in mapping(quantification.get("estimates")).items():
        result = mapping(result)
        inside = result.get("truth_inside")
        rows.append([esc(method), esc(text(result.get("estimator"), "")), interval(result),
                     points(result.get("error_points")),
                     INSIDE.get(inside, "n/a") if isinstance(inside, bool) or inside is None else odd(inside),
                     count(result.get("units"))])
    rows += [[esc(method), "not computed", esc(text(why)), "", "", ""]
             for method, why in mapping(quantification.get("unavailable")).items()]
    headline = mapping(quantification.get("estimate"))
    fallback = esc(f" ({text(headline['fallback'])})") if headline.get("fallback") else ""
    return ("<h3>Percent properly masked as an estimate (test set)</h3>"
            + table(["estimator", "", "figure (95% interval)", "error", "truth inside", "images"], rows, (0, 1, 2))
            + f'<p class="muted">True: {percent(quantification.get("true_percent"))} of '
              f'{count(quantification.get("true_faces"))} faces. Headline estimator '
              f'<b>{esc(text(headline.get("method")))}</b>{fallback}. '
              "Seeded bootstrap intervals: cc and pcc resample the images only; acc, pacc and pacc2 also the "
              "validation images their rates come from.</p>")


FILES_LISTED = 50  # files the page lists per kind of problem (skipped, objects dropped); the run's JSON holds them all:
                   # every one listed made a 12.7 MB page of a test set of 100k images with 100k such files


def files_listed(summary: str, groups: list[list[dict]], listed_in: str) -> str:
    """A <details> of *summary*: the first FILES_LISTED entries ({file, reason}) of each of *groups*, a line each,
    then a count of the rest, which the output *listed_in* lists."""
    listed = [entry for group in groups for entry in group[:FILES_LISTED]]
    items = "".join(f"<li><code>{esc(text(e.get('file')))}</code>: {esc(text(e.get('reason')))}</li>" for e in listed)
    if (more := sum(map(len, groups)) - len(listed)) > 0:
        items += f"<li>and {more} more: <code>{esc(listed_in)}</code> lists them all</li>"
    return f"<details><summary>{summary}</summary><ul>{items}</ul></details>"


def card(label: str, value: str, sub: str = "", css: str = "") -> str:
    sub_html = f'<div class="sub">{sub}</div>' if sub else ""
    return (f'<div class="card"><div class="label">{esc(label)}</div><div class="value {css}">{value}</div>'
            f'{sub_html}</div>')


def image_data_uri(data: bytes, max_px: int, jpeg_quality: int | None = None) -> str:
    """The image downscaled to at most *max_px* wide (and tall, for thumbnails), as a data: URI;
    JPEG when *jpeg_quality* is given (photos), else PNG (plots keep their sharp lines)."""
    check_image_pixels(io.BytesIO(data), D.IMAGE_MAX_PIXELS, "the image")
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        bound = (max_px, max_px) if jpeg_quality else (max_px, max_px * 4)
        image.thumbnail(bound, Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        if jpeg_quality:
            image.convert("RGB").save(buffer, "JPEG", quality=jpeg_quality, optimize=True)
            mime = "image/jpeg"
        else:
            image.save(buffer, "PNG", optimize=True)
            mime = "image/png"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"
