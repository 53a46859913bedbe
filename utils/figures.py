"""How a percent is shown to people: one decimal, the same in every output that shows it; the words that name the
count at the threshold apart from the headline estimate (KEPT_MASKED); and a user's name in a
figure (figure_label).

The outputs store the figure to two decimals (utils/detection/quantify.py); the lines the jobs print, the run
report and the service's page show it to one. Python's format rounds a tie to even ('6.25' -> '6.2') where the
page's JavaScript toFixed(1) rounds it up ('6.3'): the same figure read 6.2 % in the terminal and the report and
6.3 % on the page. one_decimal is toFixed(1)'s rule (the float's exact value, a tie away from zero), so all agree.
What is shown is the stored figure: the page rounds a percent it counts itself to two decimals first (oneDecimal
in page.html), so 7 of 13 faces (53.846 %, stored 53.85) reads 53.9 % there as in the report.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Context, Decimal

# Digits enough for any finite float to one decimal (1.8e308: 309 before the point); the default context's 28
# refused a figure of 1e28 or more (decimal.InvalidOperation), which a damaged run file can hold.
_EXACT = Context(prec=400)


def one_decimal(value: float) -> str:
    """*value* to one decimal as JavaScript's value.toFixed(1) writes it: one_decimal(6.25) == '6.3'."""
    return str(Decimal(float(value)).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP, context=_EXACT))


FIGURE_LABEL_CHARS = 60  # a folder's, video's or run's name in a figure is cut to this many characters: bbox_inches=
                         # "tight" widens the figure to hold the whole text, and a 300-character folder name drew the
                         # plot per folder 3351 px wide with its bars squeezed into the right fifth


def figure_label(text: str, limit: int = FIGURE_LABEL_CHARS) -> str:
    """*text* (a user's folder or file name) as a figure shows it: at most *limit* characters, its start and end kept
    about an ellipsis (a site and a day both tell folders apart), and a character that does not print (a tab, a line
    break) drawn as '?', so that one row stays one line."""
    text = "".join(c if c.isprintable() else "?" for c in text)
    if len(text) <= limit:
        return text
    head = (limit - 1) // 3
    return text[:head] + "\u2026" + text[len(text) - (limit - 1 - head):]


# The words for the two figures of a set of photos, defined here once. "properly masked" names the headline estimate
# alone (utils/detection/quantify.estimate, with its interval: pacc2 or its fallback); the plain count of the faces
# kept at the score threshold (cc, compliance.json's percent_properly_masked) is named as what it is. The report and
# the service's page called the count "properly masked" (45.8 %) where the printed line gave the headline (41.9 %)
# so, for the same photos. utils/service/page.html (JavaScript, no import) writes the two strings below as they are
# here: tests/test_figure_words.py holds them to it.
KEPT_MASKED = "with_mask among the faces kept at the threshold (cc)"
NO_FACE_KEPT = "no face kept at the threshold"
# beside no face kept, what a figure from the score sums rests on (the estimators read scores under the threshold)
BELOW_ONLY = "the estimate reads the scores below it"


def kept_text(percent: float | None) -> str:
    """The count at the threshold as shown: '45.8% with_mask among the faces kept at the threshold (cc)', or
    'no face kept at the threshold'; never 'properly masked', which is the headline estimate's."""
    return NO_FACE_KEPT if percent is None else f"{one_decimal(percent)}% {KEPT_MASKED}"
