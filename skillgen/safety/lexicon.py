"""Layer 2 of the prompt policy: multilingual term lists matched with Aho-Corasick automata (pyahocorasick).

Each reading of a prompt (normalize.views) is one line of words, and four automata run over it:
- whole words and phrases, with their inflections (" nude ", " severed heads ", " desnudas ");
- stems, at the start of a word ("обезглав" in "обезглавленный");
- terms glued inside a longer word ("nudewoman", "hotsexscene", "bloodsoaked"): a glued term counts when what is
  left of the word on each side is empty or everyday words (terms/glue/, or other terms), so "therapist" ("the"
  is no everyday word here), "Essex" and "Scunthorpe" pass; a word split in two ("nu de") is joined too;
- Han, Kana, Hangul and Thai terms as substrings of the squashed text ("暴力", "ヌード", "누드").
Then the allowlist (terms/allow/: Essex, cocktail, Gore-Tex, nude lipstick, 성기사, 裸足) drops every hit that lies
inside an allowed word or phrase, and a negator just before a hit ("no", "non", "ohne", "sin", "без", "非",
"没有", "비") or just after it ("~free", "~なし", "~없는") marks it negated: a negated term does not block a prompt
("non-violent", "非暴力", "gewaltfrei"), while in a negative prompt it is the trick (`negative.py`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import ahocorasick

from skillgen.safety.normalize import NO_SPACE_CHAR, squashed
from skillgen.safety.wordlists import TERMS_DIR, Term, load_terms, load_words

_RIGHT_ENDINGS = frozenset({"s", "es", "y", "ies", "ed", "d", "ing", "er", "ers", "e", "en", "a", "o", "as", "os"})
_MAX_GAP = 2  # Han/Kana/Hangul characters allowed between a multi-character negator and its term


@dataclass(frozen=True)
class Hit:
    category: str
    term: str  # the list entry, as written
    matched: str  # the words of the prompt that matched
    how: str  # "word", "stem", "glued", "split", "cjk"
    negated: bool = False


@dataclass
class Scan:
    hits: list[Hit] = field(default_factory=list)  # blocking and negated hits
    allowed: list[Hit] = field(default_factory=list)  # hits the allowlist dropped
    masks: set[str] = field(default_factory=set)  # allowlisted phrases and negated terms: the semantic layer skips them

    def blocking(self) -> list[Hit]:
        return [h for h in self.hits if not h.negated]

    def negated(self) -> list[Hit]:
        return [h for h in self.hits if h.negated]


def _automaton(entries: Iterable[tuple[str, object]]) -> ahocorasick.Automaton | None:
    grouped: dict[str, list] = {}
    for key, value in entries:
        grouped.setdefault(key, []).append(value)
    if not grouped:
        return None
    automaton = ahocorasick.Automaton()
    for key, values in grouped.items():
        automaton.add_word(key, (len(key), tuple(values)))
    automaton.make_automaton()
    return automaton


def _iter(automaton: ahocorasick.Automaton | None, text: str):
    if automaton is None:
        return
    for end, (length, values) in automaton.iter(text):
        yield end - length + 1, end + 1, values


class _Line:
    """One reading as a padded line of words, with the word at each character."""

    def __init__(self, words: tuple[str, ...]):
        self.words = words
        self.text = " " + " ".join(words) + " "
        self.starts: list[int] = []
        self.at: list[int] = [-1] * len(self.text)
        pos = 1
        for i, word in enumerate(words):
            self.starts.append(pos)
            for k in range(pos, pos + len(word)):
                self.at[k] = i
            pos += len(word) + 1


class Lexicon:
    """The term lists of every category, the allowlist, negators, glue words and clothing words, compiled."""

    def __init__(self, term_files: Sequence[Path], root: Path = TERMS_DIR) -> None:
        self.terms: list[Term] = load_terms(term_files)
        self.allow = load_words(root / "allow")
        negators = load_words(root / "negators", inflect=False)
        self.glue = load_words(root / "glue")
        self.clothing = load_words(root / "clothing")  # negated in a prompt: nudity
        self.clothing_mild = load_words(root / "clothing" / "mild")  # the negative prompt's check only
        cjk = [n for n in negators if NO_SPACE_CHAR.search(n)]
        self.prefix_negators = frozenset(n for n in negators if not n.startswith("~") and n not in cjk)
        self.suffix_negators = frozenset(n[1:] for n in negators if n.startswith("~") and n not in cjk)
        self.cjk_prefix_negators = tuple(sorted(n for n in cjk if not n.startswith("~")))
        self.cjk_suffix_negators = tuple(sorted(n[1:] for n in cjk if n.startswith("~")))
        single_forms = {f for t in self.terms if t.mode in ("word", "exact") for f in t.forms if " " not in f}
        self.vocab = frozenset({g for g in self.glue if " " not in g} | single_forms)
        words = [(i, f) for i, t in enumerate(self.terms) if t.mode in ("word", "exact") for f in t.forms]
        # a phrase also matches written as one word ("bloodsoaked"), and glued into another (below)
        self._words = _automaton((f" {k} ", i) for i, f in words for k in {f, f.replace(" ", "")})
        self._stems = _automaton((f" {t.forms[0]}", i) for i, t in enumerate(self.terms) if t.mode == "stem")
        glued = [(f.replace(" ", ""), i) for i, f in words if self.terms[i].glue]
        self._glued = _automaton((k, i) for k, i in glued if len(k) >= 3)
        self._split = {k: i for k, i in glued if len(k) >= 4}
        self._cjk = _automaton((t.forms[0], i) for i, t in enumerate(self.terms) if t.mode == "cjk")
        self._allow = _automaton((f" {a} ", a) for a in self.allow if not NO_SPACE_CHAR.search(a))
        self._allow_cjk = _automaton((a, a) for a in self.allow if NO_SPACE_CHAR.search(a))
        latin = [c for c in self.clothing if not NO_SPACE_CHAR.search(c)]
        cjk_clothing = [c for c in self.clothing if NO_SPACE_CHAR.search(c)]
        self._unclothed = _automaton((f" {c} ", c) for c in latin)
        self._unclothed_cjk = _automaton((c, c) for c in cjk_clothing if len(c) >= 2)  # 不服 is "not convinced"
        every = [*self.clothing, *self.clothing_mild]
        self._clothing = _automaton((f" {c} ", c) for c in every if not NO_SPACE_CHAR.search(c))
        self._clothing_glued = _automaton((c, c) for c in every if not NO_SPACE_CHAR.search(c)
                                          and " " not in c and len(c) >= 4)
        self._clothing_cjk = _automaton((c, c) for c in every if NO_SPACE_CHAR.search(c))

    # -- what the fingerprint hashes ----------------------------------------------------------------------------
    def describe(self) -> dict:
        def digest(items: Iterable[str]) -> str:
            return hashlib.sha256(json.dumps(sorted(items), ensure_ascii=True).encode()).hexdigest()
        return {
            "terms": sorted([t.category, t.mode, t.text, int(t.glue), digest(t.forms)] for t in self.terms),
            "allow": digest(self.allow), "glue": digest(self.glue), "clothing": digest(self.clothing),
            "clothing_mild": digest(self.clothing_mild),
            "negators": digest([*self.prefix_negators, *(f"~{n}" for n in self.suffix_negators),
                                *self.cjk_prefix_negators, *(f"~{n}" for n in self.cjk_suffix_negators)]),
        }

    # -- matching ---------------------------------------------------------------------------------------------
    def scan(self, folded: str, views: Sequence[tuple[str, ...]]) -> Scan:
        scan = Scan()
        seen: set[Hit] = set()
        for words in views:
            for hit in self._scan_line(_Line(words), scan.masks):
                self._keep(scan, seen, hit)
        for hit in self._scan_cjk(squashed(folded), scan.masks):
            self._keep(scan, seen, hit)
        scan.masks.update(h.matched for h in scan.hits if h.negated)
        return scan

    @staticmethod
    def _keep(scan: Scan, seen: set[Hit], item: tuple[Hit, bool]) -> None:
        hit, allowed = item
        if hit in seen:
            return
        seen.add(hit)
        (scan.allowed if allowed else scan.hits).append(hit)

    def composable(self, rest: str, right: bool = False) -> bool:
        """Whether what a glued term leaves of its word is everyday words (or digits, or an ending after it)."""
        if not rest or rest.isdigit() or (right and rest in _RIGHT_ENDINGS):
            return True
        if len(rest) > 40:
            return False
        ok = [True] + [False] * len(rest)
        for j in range(3, len(rest) + 1):
            ok[j] = any(ok[i] and rest[i:j] in self.vocab for i in range(max(0, j - 24), j - 2))
        return ok[-1] or (right and any(ok[-1 - len(e)] for e in _RIGHT_ENDINGS if len(e) < len(rest)))

    def _negated(self, words: tuple[str, ...], first: int, end: int) -> bool:
        before = [words[first - 1] if first >= 1 else "", " ".join(words[max(0, first - 2):first])]
        if any(b in self.prefix_negators for b in before if b):
            return True
        if first >= 2 and words[first - 2] in self.prefix_negators and len(words[first - 1]) > 1:
            return True  # one word between: "without any gore", "sin ninguna violencia"
        return end < len(words) and words[end] in self.suffix_negators

    def _scan_line(self, line: _Line, masks: set[str]) -> Iterable[tuple[Hit, bool]]:
        words, text = line.words, line.text
        allowed = []
        for s, e, entries in _iter(self._allow, text):
            allowed.append((line.at[s + 1], line.at[e - 2] + 1))
            masks.update(entries)

        def inside_allowed(first: int, end: int) -> bool:
            return any(a <= first and end <= b for a, b in allowed)

        for s, e, idxs in _iter(self._words, text):
            first, end = line.at[s + 1], line.at[e - 2] + 1
            negated = self._negated(words, first, end)
            for i in idxs:
                term = self.terms[i]
                yield Hit(term.category, term.source, " ".join(words[first:end]), "word", negated), \
                    inside_allowed(first, end)
        for s, _, idxs in _iter(self._stems, text):
            first = line.at[s + 1]
            negated = self._negated(words, first, first + 1)
            for i in idxs:
                term = self.terms[i]
                yield Hit(term.category, term.source, words[first], "stem", negated), inside_allowed(first, first + 1)
        for s, e, idxs in _iter(self._glued, text):
            k = line.at[s]
            word = words[k]
            left, right = word[: s - line.starts[k]], word[e - line.starts[k]:]
            if not left and not right:
                continue  # the whole word: matched above
            negated = (left in self.prefix_negators and not right) or (right in self.suffix_negators)
            if not negated and not (self.composable(left) and self.composable(right, right=True)):
                continue
            for i in idxs:
                term = self.terms[i]
                yield Hit(term.category, term.source, word, "glued", negated), inside_allowed(k, k + 1)
        for s, e, entries in _iter(self._unclothed, text):  # "without clothes", "no underwear", "ohne Kleidung"
            first, end = line.at[s + 1], line.at[e - 2] + 1
            if self._negated(words, first, end):
                yield Hit("sexual", f"negated clothing: {entries[0]}", " ".join(words[max(0, first - 2):end]),
                          "unclothed"), inside_allowed(first, end)
        for k in range(len(words) - 1):
            a, b = words[k], words[k + 1]
            i = self._split.get(a + b)
            if i is not None and not (a in self.vocab and b in self.vocab):
                term = self.terms[i]
                yield Hit(term.category, term.source, f"{a} {b}", "split", self._negated(words, k, k + 2)), \
                    inside_allowed(k, k + 2)

    def _scan_cjk(self, text: str, masks: set[str]) -> Iterable[tuple[Hit, bool]]:
        allowed = [(s, e) for s, e, _ in _iter(self._allow_cjk, text)]
        masks.update(text[s:e] for s, e in allowed)
        for s, e, entries in _iter(self._unclothed_cjk, text):  # 没有衣服, 服なし... with a negator
            if self._cjk_negated(text, s, e):
                yield Hit("sexual", f"negated clothing: {entries[0]}", text[max(0, s - 2):e], "unclothed"), False
        for s, e, idxs in _iter(self._cjk, text):  # (_iter yields nothing for an absent automaton)
            negated = self._cjk_negated(text, s, e)
            covered = any(a <= s and e <= b for a, b in allowed)
            for i in idxs:
                term = self.terms[i]
                yield Hit(term.category, term.source, text[s:e], "cjk", negated), covered

    def _cjk_negated(self, text: str, start: int, end: int) -> bool:
        for neg in self.cjk_prefix_negators:
            gaps = range(_MAX_GAP + 1) if len(neg) > 1 else (0,)
            if any(text[max(0, start - g - len(neg)):start - g] == neg for g in gaps if start - g - len(neg) >= 0):
                return True
        return any(text.startswith(neg, end + g) for neg in self.cjk_suffix_negators for g in (0, 1))

    # -- the negative prompt's clothing words -------------------------------------------------------------------
    def clothing_in(self, folded: str, views: Sequence[tuple[str, ...]]) -> list[str]:
        found: list[str] = []
        for words in views:
            line = _Line(words)
            found += [v for _, _, values in _iter(self._clothing, line.text) for v in values]
            for s, e, values in _iter(self._clothing_glued, line.text):
                k = line.at[s]
                word = words[k]
                left, right = word[: s - line.starts[k]], word[e - line.starts[k]:]
                if self.composable(left) and self.composable(right, right=True):
                    found += list(values)
        found += [v for _, _, values in _iter(self._clothing_cjk, squashed(folded)) for v in values]
        return list(dict.fromkeys(found))
