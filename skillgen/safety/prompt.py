"""The prompt policy: a layered filter over a prompt and its negative prompt, the same in every process.

    policy = PromptPolicy.from_settings()
    policy.check("a violinist's bow hold")                  # Decision(allowed=True)
    policy.check("a portrait", negative="clothes")          # blocked: the negative prompt's trick
    policy.explain("nudewoman")                              # each layer's verdict, for `skillgen safety explain`

The bots run it early (a refusal before anything is queued), the consumer authoritatively, replay and the trainer
too. The layers, cheapest first; the first that blocks decides:
1. normalise (normalize.py): confusables skeleton, NFKC, case folding, separators inside words, repeated letters,
   leetspeak, weight syntax; every later layer reads its output.
2. lexicon (lexicon.py, terms/): multilingual term lists, whole words with inflections and glued into other
   words, with an allowlist (Essex, therapist, nude lipstick) and negations (non-violent, 非暴力, gewaltfrei).
3. negative: the negative prompt may not take clothing away ("--no clothes", "ohne Kleidung") nor rule out the
   absence of a blocked thing ("--no non-violent"); a plain blocked term there ("--no nsfw, gore") steers away from
   it and is allowed.
4. semantic (semantic.py): a character n-gram classifier for paraphrases the lists miss.
Every refusal carries its category, the layer that fired, and a reference id that ends its reason, "(ref 3fa9c2d1)";
with SKILL_SAFETY_AUDIT_LOG set, each refusal is also appended to that JSON-lines file (audit.py).
Pure Python and numpy: safe to import and run in the bots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from skillgen.safety.audit import AuditLog, from_setting, reference, with_ref
from skillgen.safety.decision import Decision
from skillgen.safety.lexicon import Hit, Lexicon, Scan
from skillgen.safety.normalize import fold, views
from skillgen.safety.semantic import SemanticModel, default_model
from skillgen.safety.settings import SafetySettings
from skillgen.safety.wordlists import TERMS_DIR

DEFAULT_TERMS_DIR = TERMS_DIR
LAYERS = ("normalise", "lexicon", "negative", "semantic")

_DESCRIPTIONS = {
    "sexual": "sexual content or nudity",
    "violence": "graphic violence or gore",
}


def normalize(text: str) -> str:
    """Fold a prompt or a term to the form both are matched in (normalize.fold; kept under its old name)."""
    return fold(text)


def reason_for(category: str, negative: bool = False, clothing: bool = False) -> str:
    description = _DESCRIPTIONS.get(category)
    if negative:
        what = description or f"content this workspace does not allow ({category})"
        why = " (it takes clothing away)" if clothing else ""
        return f"Your prompt was blocked: its negative prompt (--no) steers toward {what}{why}."
    if description:
        return f"Your prompt was blocked: it asks for {description}."
    return f"Your prompt was blocked: it uses a term this workspace does not allow ({category})."


@dataclass(frozen=True)
class LayerVerdict:
    layer: str
    blocked: bool
    category: str | None = None
    detail: str = ""


def _describe(hit: Hit) -> str:
    note = " (negated)" if hit.negated else ""
    return f"{hit.how} {hit.term!r} in {hit.matched!r}{note}"


def _first(hits: Sequence[Hit]) -> Hit:
    return sorted(hits, key=lambda h: (h.category, h.how != "word"))[0]


class PromptPolicy:
    """Blocks prompts that ask for what the term lists or the semantic layer refuse; see the module docstring.

    The default lists live in skillgen/safety/terms/; `extra_terms` adds files in the same format (a team's own
    category). `semantic=False` leaves the learned layer out (a test of the lists alone); `audit_log` is a path
    for the JSON-lines audit log (SKILL_SAFETY_AUDIT_LOG).
    """

    def __init__(self, extra_terms: Sequence[str | Path] = (), *, semantic: bool | SemanticModel = True,
                 audit_log: Path | None = None) -> None:
        self.lexicon = Lexicon(sorted(DEFAULT_TERMS_DIR.glob("*.txt")) + [Path(p) for p in extra_terms])
        if isinstance(semantic, SemanticModel):
            self.semantic: SemanticModel | None = semantic
        else:
            self.semantic = default_model() if semantic else None
        self.audit: AuditLog | None = from_setting(audit_log)

    @classmethod
    def from_settings(cls, settings: SafetySettings | None = None) -> PromptPolicy:
        settings = settings or SafetySettings()
        return cls(extra_terms=settings.extra_terms, audit_log=settings.audit_log)

    # -- the layers ---------------------------------------------------------------------------------------------
    def _lexicon(self, folded: str, scan: Scan | None = None) -> LayerVerdict:
        scan = scan or self.lexicon.scan(folded, views(folded))
        blocking = scan.blocking()
        if blocking:
            hit = _first(blocking)
            return LayerVerdict("lexicon", True, hit.category, _describe(hit))
        passed = [f"allowlisted {_describe(h)}" for h in scan.allowed] + [_describe(h) for h in scan.negated()]
        return LayerVerdict("lexicon", False, None, "; ".join(passed) or "no term")

    def _negative(self, folded: str) -> LayerVerdict:
        if not folded.strip():
            return LayerVerdict("negative", False, None, "no negative prompt")
        clothing = self.lexicon.clothing_in(folded, views(folded))
        if clothing:
            return LayerVerdict("negative", True, "sexual", f"clothing in the negative prompt: {', '.join(clothing)}")
        scan = self.lexicon.scan(folded, views(folded))
        negated = scan.negated()
        if negated:
            hit = _first(negated)
            return LayerVerdict("negative", True, hit.category, f"negated term in the negative prompt: {_describe(hit)}")
        away = [_describe(h) for h in scan.blocking()]
        return LayerVerdict("negative", False, None, ("steers away from " + "; ".join(away)) if away else "fine")

    def masks(self, prompt: str) -> set[str]:
        """What the lexicon allowed or found negated in a prompt: the semantic layer reads the prompt without it."""
        folded = fold(prompt)
        return self.lexicon.scan(folded, views(folded)).masks

    def _semantic(self, prompt: str, masks: set[str]) -> LayerVerdict:
        if self.semantic is None:
            return LayerVerdict("semantic", False, None, "off")
        scores = self.semantic.scores(prompt, masks, self.lexicon.prefix_negators)
        shown = ", ".join(f"{c} {s:.3f}/{t:.3f}" for (c, s), t in zip(scores.items(), self.semantic.thresholds))
        flagged = self.semantic.flagged(scores)
        if flagged:
            return LayerVerdict("semantic", True, flagged[0][0], f"score/threshold {shown}")
        return LayerVerdict("semantic", False, None, f"score/threshold {shown}")

    def explain(self, prompt: str, negative: str = "") -> list[LayerVerdict]:
        """Every layer's verdict on this prompt (no early exit), normalisation first."""
        folded, folded_negative = fold(prompt), fold(negative)
        shown = f"prompt {folded!r}" + (f", negative {folded_negative!r}" if negative else "")
        scan = self.lexicon.scan(folded, views(folded))
        return [LayerVerdict("normalise", False, None, shown), self._lexicon(folded, scan),
                self._negative(folded_negative), self._semantic(prompt, scan.masks)]

    def check(self, prompt: str, negative: str = "") -> Decision:
        """The decision on a prompt and its negative prompt (blocked by the first layer that refuses)."""
        folded = fold(prompt)
        folded_negative = fold(negative) if negative else ""
        scan = self.lexicon.scan(folded, views(folded))
        for run in (lambda: self._lexicon(folded, scan), lambda: self._negative(folded_negative),
                    lambda: self._semantic(prompt, scan.masks)):
            verdict = run()
            if verdict.blocked:
                return self._refuse(verdict, folded, folded_negative)
        return Decision(allowed=True)

    def _refuse(self, verdict: LayerVerdict, folded: str, folded_negative: str) -> Decision:
        category = verdict.category or "sexual"
        ref = reference(f"{folded}\0{folded_negative}")
        reason = reason_for(category, negative=verdict.layer == "negative",
                            clothing=verdict.detail.startswith("clothing"))
        if self.audit is not None:
            self.audit.write({"ref": ref, "kind": "prompt", "category": category, "layer": verdict.layer,
                              "detail": verdict.detail, "text": folded, "negative": folded_negative})
        return Decision(allowed=False, reason=with_ref(reason, ref), category=category, detail=verdict.detail,
                        ref=ref, layer=verdict.layer)
