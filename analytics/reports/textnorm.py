"""One spelling of a question before anything reads it.

The screens (instructions to the system, forecasts, writes) and the parser must see the
same letters a reader sees: compatibility forms (fullwidth ``ｉｇｎｏｒｅ``, ``NO₂``) are
folded by NFKC, invisible format characters (zero-width space, joiners, bidi marks)
are removed, and letters from other scripts that look like Latin ones (Cyrillic ``о``,
Greek ``ο``) are replaced by them, using the Unicode confusables data that
``confusable-homoglyphs`` ships.
"""

from __future__ import annotations

import re
import unicodedata

from confusable_homoglyphs import confusables

# Units people paste: kept as they are (µ folds to Greek mu under NFKC, and mu looks
# like "u"), so "µg/m³" still reads as a unit.
_KEEP = frozenset("µμ³²°")


def _latin_lookalikes(text: str) -> dict[str, str]:
    found = confusables.is_confusable(text, greedy=True, preferred_aliases=["latin"])
    swaps: dict[str, str] = {}
    for hit in found or ():
        char = hit["character"]
        if char in _KEEP:
            continue
        latin = [h["c"] for h in hit["homoglyphs"] if h["c"].isascii() and h["c"].isalpha()]
        if latin:
            swaps[char] = latin[0]
    return swaps


def normalise(text: str) -> str:
    """``text`` folded to what it reads as: NFKC, no format characters, Latin
    look-alikes replaced, lower case, quotes unified, spaces collapsed."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    if not text.isascii():
        for char, latin in _latin_lookalikes(text).items():
            text = text.replace(char, latin)
    text = text.lower().replace("’", "'").replace("‘", "'")
    text = re.sub(r"[?!;\"()\[\]]", " ", text)
    return re.sub(r"\s+", " ", text).strip()
