"""Layer 3 of the prompt policy: a learned check for paraphrases the term lists miss.

What it is, and why: a linear classifier (one logistic regression per category, "sexual" and "violence") over hashed
character n-grams (2 to 5 characters, inside words) and word unigrams and bigrams of the cleaned prompt
(normalize.cleaned: folded, separators inside words removed, repeats squeezed). No embedding model can be
downloaded here, and no PyPI wheel we found ships a small multilingual sentence encoder inside it, so the model is
our own: character n-grams work in every script without a tokenizer (Han and Kana bigrams, Cyrillic and German
stems, inflections and misspellings share most of their n-grams), it scores a prompt in well under a millisecond on
one CPU core with numpy alone (no torch in the bots), and its weights are a small `.npz` of plain arrays loaded with
`allow_pickle=False`.

It is trained by `python -m skillgen.safety.train` on the dev split of the labelled set
(skillgen/safety/data/prompts.dev.jsonl): 80% to fit, 20% held out to set each category's threshold (the lowest
score that keeps false blocks on the held-out benign prompts at or under the target rate). The test split
(prompts.test.jsonl) is never seen by training; `skillgen safety bench` reports on it.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from skillgen.safety.errors import SafetyError
from skillgen.safety.normalize import NO_SPACE_CHAR, cleaned

WEIGHTS = Path(__file__).parent / "model" / "semantic.npz"
BITS = 17
NGRAMS = (2, 3, 4, 5)
MIN_WORDS = 2  # a lone word is the lexicon's to judge; a paraphrase takes a few
_WORD = re.compile(r"[^\W_]+")


def _words(text: str) -> list[str]:
    # Han, Kana, Hangul and Thai runs stay whole: their n-grams are their words
    return _WORD.findall(text)


def masked(clean: str, masks: Iterable[str]) -> str:
    """A cleaned prompt without the allowlisted phrases and negated terms the lexicon found in it ("naked eye",
    "Gore-Tex", "no nudity"): the lexicon has judged those words, so they do not count here either."""
    for mask in sorted(masks, key=len, reverse=True):
        if NO_SPACE_CHAR.search(mask):
            clean = clean.replace(mask, " ")
        elif mask.split():
            pattern = r"[\W_]*".join(re.escape(w) for w in mask.split())
            clean = re.sub(rf"(?<![^\W_]){pattern}(?![^\W_])", " ", clean)
    return clean


def features(text: str, bits: int = BITS, masks: Iterable[str] = (), drop: frozenset[str] = frozenset()) -> np.ndarray:
    """The distinct hashed feature indices of a prompt (int64, sorted): none when fewer than `MIN_WORDS` words are
    left once `masks` are removed and the words in `drop` (the negators: "no", "without") are skipped, each with
    the word after it."""
    clean = masked(cleaned(text), masks)
    words: list[str] = []
    skip = False
    for word in _words(clean):  # a negator and the word it negates ("no violence") ask for nothing
        if word in drop:
            skip = True
        elif skip:
            skip = False
        else:
            words.append(word)
    if len(words) < MIN_WORDS:
        return np.zeros(0, dtype=np.int64)
    grams: set[str] = set()
    for word in words:
        padded = f" {word} " if not NO_SPACE_CHAR.search(word) else word
        for n in NGRAMS:
            grams.update(padded[i:i + n] for i in range(max(1, len(padded) - n + 1)))
        grams.add("w:" + word)
    grams.update(f"b:{a} {b}" for a, b in zip(words, words[1:]))
    mask = (1 << bits) - 1
    return np.array(sorted({zlib.crc32(g.encode()) & mask for g in grams}), dtype=np.int64)


@dataclass(frozen=True)
class SemanticModel:
    categories: tuple[str, ...]
    weights: np.ndarray  # (categories, 2**bits) float32
    bias: np.ndarray  # (categories,) float32
    thresholds: np.ndarray  # (categories,) probability at or above which a prompt is blocked
    bits: int
    digest: str  # sha256 of the weights file, for the fingerprint

    @classmethod
    def load(cls, path: Path = WEIGHTS) -> SemanticModel:
        try:
            raw = Path(path).read_bytes()
            with np.load(path, allow_pickle=False) as data:
                categories = tuple(str(c) for c in data["categories"])
                weights = data["weights"].astype(np.float32)
                bias, thresholds = data["bias"].astype(np.float32), data["thresholds"].astype(np.float64)
                bits = int(data["bits"])
        except (OSError, KeyError, ValueError) as exc:
            raise SafetyError(f"cannot load the semantic layer's weights from {path}: {exc}") from exc
        if weights.shape != (len(categories), 1 << bits) or bias.shape != thresholds.shape != (len(categories),):
            raise SafetyError(f"{path}: weights of shape {weights.shape} do not fit {len(categories)} categories")
        return cls(categories, weights, bias, thresholds, bits, hashlib.sha256(raw).hexdigest())

    def scores(self, text: str, masks: Iterable[str] = (), drop: frozenset[str] = frozenset()) -> dict[str, float]:
        """Each category's probability for this prompt (`masks`: what the lexicon allowed or found negated; `drop`:
        words skipped); 0 for every category when too little is left to judge (`features`)."""
        idx = features(text, self.bits, masks, drop)
        if len(idx) == 0:
            return dict.fromkeys(self.categories, 0.0)
        logits = self.weights[:, idx].sum(axis=1) / np.sqrt(len(idx)) + self.bias
        probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        return {c: float(p) for c, p in zip(self.categories, probs)}

    def flagged(self, scores: dict[str, float]) -> list[tuple[str, float]]:
        """The categories at or over their threshold, highest margin first."""
        over = [(c, s, s - t) for c, s, t in zip(self.categories, scores.values(), self.thresholds) if s >= t]
        return [(c, s) for c, s, _ in sorted(over, key=lambda x: -x[2])]

    def describe(self) -> dict:
        return {"weights": self.digest, "thresholds": [round(float(t), 6) for t in self.thresholds],
                "categories": list(self.categories), "bits": self.bits, "ngrams": list(NGRAMS), "min_words": MIN_WORDS}


@cache
def default_model() -> SemanticModel:
    return SemanticModel.load(WEIGHTS)
