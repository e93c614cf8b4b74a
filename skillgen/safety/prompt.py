"""The prompt policy: normalize a prompt against evasions, then match it against term lists.

Normalization (applied to prompts and to terms alike, so a list entry is written plainly):
NFKD, removal of format characters (zero-width and bidi controls), fillers and combining
diacritics, Cyrillic/Greek/small-capital look-alikes folded to Latin, case folding, NFKC,
and weight syntax such as `(word:1.3)` reduced to `(word)`.

Matching, per term, decided by the term's script (see terms/sexual.en.txt for the file format):
- terms with Han, Kana or Thai characters match as substrings of the prompt with every space and
  punctuation mark removed, since those scripts do not separate words;
- every other term matches whole words, in three views of the prompt: as written, with leetspeak
  read as letters (1 as i, then 1 as l), and, within runs of single letters split by spaces or
  punctuation ("n u d e", "n.u.d.e"), joined up. A word boundary is any character that is not a
  letter, so Essex, Scunthorpe and therapist pass while "nude2" and "一个nude" do not.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from skillgen.safety.decision import Decision
from skillgen.safety.errors import SafetyError
from skillgen.safety.settings import SafetySettings

DEFAULT_TERMS_DIR = Path(__file__).parent / "terms"

_DESCRIPTIONS = {
    "sexual": "sexual content or nudity",
    "violence": "graphic violence or gore",
}

# Combining diacritics (not all of Mn: Kana voicing marks and Indic vowel signs carry meaning).
_DIACRITICS = re.compile(
    "[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe00-\ufe0f\ufe20-\ufe2f\U000e0100-\U000e01ef]"
)
# Hangul fillers render as nothing yet are letters, so the format-character filter misses them.
_FILLERS = re.compile("[\u115f\u1160\u3164\uffa0]")
_BLANKS = re.compile("[\u2800\t\n\r\f\v]")
# Format (zero-width, bidi, soft hyphen), control, surrogate and private-use characters.
_INVISIBLE_CATEGORIES = frozenset({"Cf", "Cc", "Cs", "Co"})

_LOOKALIKES = str.maketrans(
    # Cyrillic
    "АВЕЅІЈКМНОРСТХУЬаеѕіјкмнорстхуԁһԛԝӏьвгпиш"
    # Greek
    "ΑΒΕΖΗΙΚΜΝΟΡΤΥΧαβγεζηικνορτυχωμϲϳ"
    # small capitals and IPA letters
    "ᴀʙᴄᴅᴇꜰɢʜɪᴊᴋʟᴍɴᴏᴘʀꜱᴛᴜᴠᴡʏᴢɑɡı",
    "ABESIJKMHOPCTXYbaesijkmhopctxydhqwlbbrnuw"
    "ABEZHIKMNOPTYXabyeznikvoptuxwucj"
    "abcdefghijklmnoprstuvwyzagi",
)
_REGIONAL_INDICATORS = {cp: ord("a") + cp - 0x1F1E6 for cp in range(0x1F1E6, 0x1F200)}

# `(word:1.3)`, `[word:0.8]`, `<lora:name:0.7>`: the weight is noise between letters.
_WEIGHT = re.compile(r":\s*[-+]?(?:\d+(?:\.\d*)?|\.\d+)\s*(?=[)\]>}])")

_LEET_DIGITS_I = str.maketrans("01345789", "oieastbg")
_LEET_DIGITS_L = str.maketrans("01345789", "oleastbg")
# Symbols read as letters only before a letter or digit, so "gore!" and "sex$" keep their ending.
_LEET_SYMBOLS = re.compile(r"[@$!|+€](?=[^\W_])")
_LEET_SYMBOL_LETTERS = {"@": "a", "$": "s", "!": "i", "|": "l", "+": "t", "€": "e"}

# Thai, Kana and Han: scripts written without spaces between words.
_NO_SPACE_CHAR = re.compile("[\u0e00-\u0e7f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")
_NOT_WORD = re.compile(r"[\W_]+")
_LETTER_BEFORE = r"(?<![^\W\d_])"
_LETTER_AFTER = r"(?![^\W\d_])"
_SINGLE_LETTER_RUN = re.compile(_LETTER_BEFORE + r"[a-z](?:[\W_]{1,3}[a-z]" + _LETTER_AFTER + r"){2,}")
_CATEGORY = re.compile(r"[a-z0-9_-]+")


def normalize(text: str) -> str:
    """Fold a prompt or a term to the form both are matched in."""
    text = _BLANKS.sub(" ", unicodedata.normalize("NFKD", text))
    text = "".join(ch for ch in text if unicodedata.category(ch) not in _INVISIBLE_CATEGORIES)
    text = _FILLERS.sub("", _DIACRITICS.sub("", text))
    text = text.translate(_LOOKALIKES).translate(_REGIONAL_INDICATORS).casefold()
    text = unicodedata.normalize("NFKC", text)
    return _WEIGHT.sub("", text)


def _leet(text: str, one_as: str) -> str:
    text = _LEET_SYMBOLS.sub(lambda m: _LEET_SYMBOL_LETTERS[m.group()], text)
    return text.translate(_LEET_DIGITS_I if one_as == "i" else _LEET_DIGITS_L)


@dataclass(frozen=True)
class _CategoryRules:
    category: str
    words: re.Pattern[str] | None
    joined_words: re.Pattern[str] | None
    substrings: re.Pattern[str] | None


def _alternation(parts: Sequence[str]) -> str:
    # Longest first, so the logged term is the most specific one.
    return "|".join(sorted(set(parts), key=lambda p: (-len(p), p)))


def _read_terms(path: Path) -> list[tuple[int, str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SafetyError(f"cannot read term list {path}: {exc}") from exc
    return [(n, line.strip()) for n, line in enumerate(lines, 1) if line.strip() and not line.lstrip().startswith("#")]


@dataclass
class _TermPatterns:
    words: list[str] = field(default_factory=list)
    joined_words: list[str] = field(default_factory=list)
    substrings: list[str] = field(default_factory=list)


def _load_rules(files: Sequence[Path]) -> list[_CategoryRules]:
    by_category: dict[str, _TermPatterns] = {}
    for path in files:
        category = path.name.split(".", 1)[0].lower()
        if not _CATEGORY.fullmatch(category):
            raise SafetyError(f"term list {path}: name it <category>.<anything>.txt, category in a-z, 0-9, _ and -")
        patterns = by_category.setdefault(category, _TermPatterns())
        for line_no, raw in _read_terms(path):
            words = [word for word in _NOT_WORD.split(normalize(raw)) if word]
            if not words:
                raise SafetyError(f"{path}:{line_no}: term {raw!r} has no letters or digits")
            if _NO_SPACE_CHAR.search(raw):
                patterns.substrings.append(re.escape("".join(words)))
            else:
                patterns.words.append(r"[\W_]+".join(map(re.escape, words)))
                patterns.joined_words.append(re.escape("".join(words)))
    return [
        _CategoryRules(
            category=category,
            words=re.compile(f"{_LETTER_BEFORE}(?:{_alternation(p.words)}){_LETTER_AFTER}") if p.words else None,
            joined_words=re.compile(_alternation(p.joined_words)) if p.joined_words else None,
            substrings=re.compile(_alternation(p.substrings)) if p.substrings else None,
        )
        for category, p in sorted(by_category.items())
    ]


def _blocked(category: str, term: str) -> Decision:
    description = _DESCRIPTIONS.get(category)
    if description:
        reason = f"Your prompt was blocked: it asks for {description}."
    else:
        reason = f"Your prompt was blocked: it uses a term this workspace does not allow ({category})."
    return Decision(allowed=False, reason=reason, category=category, detail=term)


class PromptPolicy:
    """Blocks prompts that ask for content on the term lists; see the module docstring for how.

    The default lists live in skillgen/safety/terms/; `extra_terms` adds files in the same format.
    Pure Python: safe to import and run in the bots.
    """

    def __init__(self, extra_terms: Sequence[str | Path] = ()) -> None:
        self._rules = _load_rules(sorted(DEFAULT_TERMS_DIR.glob("*.txt")) + [Path(p) for p in extra_terms])

    @classmethod
    def from_settings(cls, settings: SafetySettings | None = None) -> PromptPolicy:
        return cls(extra_terms=(settings or SafetySettings()).extra_terms)

    def check(self, text: str) -> Decision:
        folded = normalize(text)
        spaced = _NO_SPACE_CHAR.sub(r" \g<0> ", folded)
        views = list(dict.fromkeys([spaced, _leet(spaced, "i"), _leet(spaced, "l")]))
        runs = list(dict.fromkeys(_joined_runs(views)))
        squashed = _NOT_WORD.sub("", folded)
        for rules in self._rules:
            for pattern, targets in (
                (rules.words, views),
                (rules.joined_words, runs),
                (rules.substrings, [squashed]),
            ):
                if pattern is None:
                    continue
                for target in targets:
                    match = pattern.search(target)
                    if match:
                        return _blocked(rules.category, match.group())
        return Decision(allowed=True)


def _joined_runs(views: Sequence[str]) -> Iterator[str]:
    for view in views:
        for match in _SINGLE_LETTER_RUN.finditer(view):
            yield _NOT_WORD.sub("", match.group())
