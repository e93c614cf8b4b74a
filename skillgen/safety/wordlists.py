"""The lexicon's data: term lists per category and language, and the lists that keep glued and negated forms fair.

    skillgen/safety/terms/<category>.<lang>.txt   blocked terms (sexual, violence, or a team's own category)
    skillgen/safety/terms/allow/<lang>.txt        words and phrases that contain a term yet are fine (Essex, 非暴力)
    skillgen/safety/terms/negators/<lang>.txt     words that negate the term after them ("no", "非"; "~free" after)
    skillgen/safety/terms/glue/<lang>.txt         everyday words a term is glued to ("nudewoman" = term + "woman")
    skillgen/safety/terms/clothing/<lang>.txt     clothing and covering words (the negative prompt's trick)

Line format (terms/sexual.en.txt documents it for list authors): one entry a line, `#` comments; `=word` is that
exact word only (no inflections, never found glued inside another word); `stem*` is any word that starts with the
stem; other Latin, Cyrillic or Greek entries match whole words with the inflections of their file's language
(`inflections`) and, when three letters or longer, glued into another word whose rest is everyday words; an entry
with Han, Kana, Hangul or Thai characters matches as a substring (those scripts do not separate words).
Every entry is folded like a prompt (normalize.fold), so a list is written plainly.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from skillgen.safety.errors import SafetyError
from skillgen.safety.normalize import NO_SPACE_CHAR, fold, tokens

TERMS_DIR = Path(__file__).parent / "terms"
_CATEGORY = re.compile(r"[a-z0-9_-]+")
LANGUAGES = ("en", "zh", "ja", "ko", "de", "fr", "es", "pt", "ru")

# Inflectional endings added to an entry's last word, by the language of its file (English for a file whose name
# names no language). Romance and Russian entries drop their own ending first (desnudo -> desnud-a, -os, ...).
_ENDINGS = {
    "en": ("s", "es", "ed", "d", "ing", "ings", "er", "ers", "ly"),
    "de": ("e", "en", "er", "es", "em", "n", "s", "t", "te", "ten", "tes", "ter", "tem", "ung", "ungen"),
    "fr": ("s", "e", "es", "x", "ee", "ees", "er", "ent", "ant", "ante", "antes", "ants"),
    "es": ("s", "es", "a", "o", "as", "os", "ado", "ada", "ados", "adas", "ido", "ida", "idos", "idas", "ando",
           "iendo", "ar", "er", "ir"),
    "pt": ("s", "es", "a", "o", "as", "os", "ado", "ada", "ados", "adas", "ido", "ida", "idos", "idas", "ando",
           "endo", "ar", "er", "ir"),
    "ru": ("а", "я", "о", "е", "ы", "и", "у", "ю", "ой", "ей", "ый", "ий", "ая", "яя", "ое", "ее", "ые", "ие", "ого",
           "его", "ому", "ему", "ым", "им", "ом", "ем", "ых", "их", "ую", "юю", "ами", "ями", "ах", "ях"),
}
_VOWEL_END = {"es": "aoe", "pt": "aoe", "fr": "e"}
_CVC = re.compile(r"[^aeiou][aeiou][bdgklmnprt]$")


@dataclass(frozen=True)
class Term:
    category: str
    text: str  # the entry as folded, for the fingerprint
    source: str  # the entry as written, for logs and `skillgen safety explain`
    mode: str  # "word", "exact", "stem" or "cjk"
    forms: tuple[str, ...]  # words joined by single spaces (cjk: the squashed substring; stem: the stem)
    glue: bool  # may be found glued inside a longer word


def inflections(word: str, lang: str) -> set[str]:
    """The forms of one (lower-case, unfolded) word: itself and its inflections in `lang`."""
    endings = _ENDINGS.get(lang, _ENDINGS["en"])
    forms = {word}
    if lang in ("en", "de") or lang not in _ENDINGS:
        forms |= {word + e for e in endings}
        if lang != "de":
            if word.endswith("e"):
                forms |= {word[:-1] + e for e in ("ing", "ings", "ed", "er", "ers", "ion", "ions")}
            if word.endswith("y") and len(word) > 3:
                forms |= {word[:-1] + e for e in ("ies", "ied")}
            if _CVC.search(word) and len(word) <= 6:
                forms |= {word + word[-1] + e for e in ("ed", "ing", "er", "ers")}
        return forms
    if lang == "ru":
        stem = next((word[: -len(e)] for e in sorted(endings, key=len, reverse=True)
                     if word.endswith(e) and len(word) - len(e) >= 4), word)
        return forms | {stem + e for e in endings}
    stem = word[:-1] if word[-1:] in _VOWEL_END.get(lang, "") and len(word) > 4 else word
    return forms | {stem + e for e in endings} | {word + "s"}


def _lines(path: Path) -> list[tuple[int, str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SafetyError(f"cannot read term list {path}: {exc}") from exc
    return [(n, line.strip()) for n, line in enumerate(lines, 1) if line.strip() and not line.lstrip().startswith("#")]


def language_of(path: Path) -> str:
    parts = path.name.split(".")
    return next((p for p in parts[1:-1] if p in LANGUAGES), parts[0] if parts[0] in LANGUAGES else "en")


def _entry(raw: str, path: Path, line_no: int) -> tuple[str, str]:
    """(mode, body) of one line; the body unfolded, marker removed."""
    if NO_SPACE_CHAR.search(raw):
        return "cjk", raw
    if raw.startswith("="):
        return "exact", raw[1:]
    if raw.endswith("*"):
        return "stem", raw[:-1]
    return "word", raw


def parse_terms(path: Path, category: str) -> list[Term]:
    lang = language_of(path)
    out: list[Term] = []
    for line_no, raw in _lines(path):
        mode, body = _entry(raw, path, line_no)
        words = list(tokens(fold(body)))
        if not words:
            raise SafetyError(f"{path}:{line_no}: term {raw!r} has no letters or digits")
        text = "".join(words) if mode == "cjk" else " ".join(words)
        if mode == "cjk":
            out.append(Term(category, text, raw, "cjk", (text,), False))
        elif mode in ("exact", "stem"):
            out.append(Term(category, text, body, mode, (text,), False))
        else:
            head = " ".join(words[:-1])
            last_raw = body.casefold().split()[-1] if body.split() else body.casefold()
            lasts = {words[-1]} | {" ".join(tokens(fold(f))) for f in inflections(last_raw, lang)}
            forms = tuple(sorted({f"{head} {w}".strip() for w in lasts if w and " " not in w}))
            out.append(Term(category, text, body, "word", forms, len("".join(words)) >= 3))
    return out


def load_terms(files: Sequence[Path]) -> list[Term]:
    terms: list[Term] = []
    for path in files:
        category = path.name.split(".", 1)[0].lower()
        if not _CATEGORY.fullmatch(category):
            raise SafetyError(f"term list {path}: name it <category>.<anything>.txt, category in a-z, 0-9, _ and -")
        terms.extend(parse_terms(path, category))
    return terms


def load_words(folder: Path, *, inflect: bool = True) -> list[str]:
    """The folded entries (words joined by single spaces; no-space scripts squashed) of every list in `folder`,
    with their inflections; an entry that starts with `~` keeps it."""
    out: set[str] = set()
    for path in sorted(folder.glob("*.txt")):
        lang = language_of(path)
        for line_no, raw in _lines(path):
            mark = "~" if raw.startswith("~") else ""
            body = raw.lstrip("~")
            words = list(tokens(fold(body)))
            if not words:
                raise SafetyError(f"{path}:{line_no}: entry {raw!r} has no letters or digits")
            if NO_SPACE_CHAR.search(body):
                out.add(mark + "".join(words))
                continue
            lasts = inflections(body.casefold().split()[-1], lang) if inflect else {words[-1]}
            head = " ".join(words[:-1])
            for last in lasts:
                folded = " ".join(tokens(fold(last)))
                if folded and " " not in folded:
                    out.add(mark + f"{head} {folded}".strip())
    return sorted(out)
