"""Train the semantic layer (semantic.py) on the dev split and save its weights; numpy only, deterministic.

    python -m skillgen.safety.train [--data skillgen/safety/data/prompts.dev.jsonl] [--out .../model/semantic.npz]

The dev split is cut 80/20 by a hash of each prompt (so a prompt always lands on the same side): the model is fit
on the 80% (one L2-regularised logistic regression per category, full-batch Adam over sparse rows) and each
category's threshold is set on the other 20%: the lowest score that blocks at most `--max-false-block` of its
benign prompts (rows labelled allow, and rows whose block is for another category or for the negative prompt only,
since this layer reads the prompt; not the "corpus" rows, everyday UI strings and place names in nine languages
from the gettext catalogues of Debian packages, which teach the model what ordinary text looks like but are too
easy to calibrate on). Prints the held-out block and false-block rates. The test split is not read.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np

from skillgen.safety.prompt import PromptPolicy
from skillgen.safety.semantic import BITS, WEIGHTS, features

DATA = Path(__file__).parent / "data"
CATEGORIES = ("sexual", "violence")


def load_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def target(row: dict, category: str) -> int:
    """1 when this row's prompt (not its negative) asks for `category`."""
    return int(row["label"] == "block" and row.get("category") == category and row.get("class") != "negative")


def _held_out(row: dict) -> bool:
    return int(hashlib.sha256(row["text"].encode()).hexdigest()[:8], 16) % 5 == 0


class _Sparse:
    """Rows of distinct feature indices, each row scaled by 1/sqrt(its length) (as semantic.scores does)."""

    def __init__(self, texts: list[str], bits: int, masks: list[set[str]], drop: frozenset[str]):
        rows = [features(t, bits, m, drop) for t, m in zip(texts, masks)]
        self.n = len(rows)
        self.indices = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        self.row = np.repeat(np.arange(self.n), [len(r) for r in rows])
        self.value = np.repeat([1 / np.sqrt(max(1, len(r))) for r in rows], [len(r) for r in rows])

    def dot(self, w: np.ndarray) -> np.ndarray:
        return np.bincount(self.row, weights=w[self.indices] * self.value, minlength=self.n)

    def tdot(self, g: np.ndarray, dim: int) -> np.ndarray:
        return np.bincount(self.indices, weights=g[self.row] * self.value, minlength=dim)


def fit(x: _Sparse, y: np.ndarray, dim: int, l2: float = 1e-4, epochs: int = 300, lr: float = 0.05) -> tuple:
    """Logistic regression, class-balanced, full-batch Adam. Returns (weights, bias)."""
    w, b = np.zeros(dim), 0.0
    pos = max(1, int(y.sum()))
    sample = np.where(y == 1, len(y) / (2 * pos), len(y) / (2 * max(1, len(y) - pos)))
    m, v, mb, vb = np.zeros(dim), np.zeros(dim), 0.0, 0.0
    for t in range(1, epochs + 1):
        p = 1 / (1 + np.exp(-(x.dot(w) + b)))
        g = (p - y) * sample / len(y)
        gw = x.tdot(g, dim) + l2 * w
        gb = g.sum()
        m, v = 0.9 * m + 0.1 * gw, 0.999 * v + 0.001 * gw * gw
        mb, vb = 0.9 * mb + 0.1 * gb, 0.999 * vb + 0.001 * gb * gb
        corr = np.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
        w -= lr * corr * m / (np.sqrt(v) + 1e-8)
        b -= lr * corr * mb / (np.sqrt(vb) + 1e-8)
    return w, b


def threshold(scores: np.ndarray, y: np.ndarray, max_false_block: float) -> float:
    """The lowest threshold whose false-block rate on the negatives is at most `max_false_block`."""
    benign = np.sort(scores[y == 0])[::-1]
    allowed = int(np.floor(max_false_block * len(benign)))
    if len(benign) == 0:
        return 0.5
    cut = benign[allowed] if allowed < len(benign) else 0.0
    return float(min(0.99, max(0.5, np.nextafter(cut, 1.0))))


def train(data: Path, out: Path, bits: int = BITS, max_false_block: float = 0.01) -> dict:
    rows = load_rows(data)
    fit_rows = [r for r in rows if not _held_out(r)]
    val_rows = [r for r in rows if _held_out(r)]
    lexicon = PromptPolicy(semantic=False)  # the semantic layer reads prompts as the policy hands them over
    drop = lexicon.lexicon.prefix_negators
    x_fit = _Sparse([r["text"] for r in fit_rows], bits, [lexicon.masks(r["text"]) for r in fit_rows], drop)
    x_val = _Sparse([r["text"] for r in val_rows], bits, [lexicon.masks(r["text"]) for r in val_rows], drop)
    dim = 1 << bits
    weights, biases, thresholds, report = [], [], [], {}
    for category in CATEGORIES:
        y_fit = np.array([target(r, category) for r in fit_rows], dtype=np.float64)
        y_val = np.array([target(r, category) for r in val_rows], dtype=np.float64)
        w, b = fit(x_fit, y_fit, dim)
        w = w.astype(np.float16).astype(np.float64)  # as saved, so the threshold fits the weights that ship
        val = 1 / (1 + np.exp(-(x_val.dot(w) + b)))
        hard = np.array([r.get("class") != "corpus" for r in val_rows])  # calibrate on prompts, not UI strings
        t = threshold(val[hard], y_val[hard], max_false_block)
        weights.append(w)
        biases.append(b)
        thresholds.append(t)
        report[category] = {
            "threshold": round(t, 4),
            "held_out_block_rate": round(float((val[y_val == 1] >= t).mean()), 4) if y_val.any() else None,
            "held_out_false_block_rate": round(float((val[y_val == 0] >= t).mean()), 4),
            "fit": len(fit_rows), "held_out": len(val_rows),
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out, categories=np.array(CATEGORIES), weights=np.array(weights, dtype=np.float16),
        bias=np.array(biases, dtype=np.float32), thresholds=np.array(thresholds, dtype=np.float64),
        bits=np.array(bits),
    )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA / "prompts.dev.jsonl")
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--max-false-block", type=float, default=0.01)
    args = parser.parse_args(argv)
    print(json.dumps(train(args.data, args.out, max_false_block=args.max_false_block), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
