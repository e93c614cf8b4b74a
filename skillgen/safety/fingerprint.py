"""The safety policy's fingerprint: a short hash of everything that decides whether an image may be shown.

    policy = policy_fingerprint(SafetySettings())   # e.g. "3f9a1c0d2b7e4a58"

The consumer mixes it into every cache key (consumer/keys.py), so an image cached under one policy is never
served under another: tightening a term list, a threshold or the post-processing rule makes every old entry a
miss, and the picture is drawn and checked again. What goes in:

- the prompt policy, each of its layers: the lexicon's compiled entries (every term of the default lists and of
  SKILL_SAFETY_EXTRA_TERMS after folding, with its matching mode and inflected forms, and digests of the
  allowlist, negators, glue and clothing words; reformatting a list or a comment changes nothing), what the
  normaliser makes of a probe of every evasion it folds plus a digest of its confusables table, the semantic
  layer's weights file and thresholds, and PROMPT_RULES_VERSION;
- the image policy: NudeNet's detector model (the bytes of the ONNX file its wheel ships) with the labels and
  scores that decide, SKILL_SAFETY_NSFW_THRESHOLD, and whether StableDiffusionSafetyChecker runs and with
  which weights (the files under SKILL_SAFETY_CHECKER_DIR, never its path, which differs between hosts);
- postprocess.POSTPROCESS_VERSION.

The same settings and code give the same fingerprint in every process: JSON with sorted keys over values only
(no object ids, paths, timestamps or set order). Computing it reads the term lists and hashes the checkers'
files (about a second with the SD checker's weights): the consumer does it once at start, in a thread.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

from skillgen.safety import image, normalize, postprocess, prompt
from skillgen.safety.settings import SafetySettings

# Bump when the prompt policy's normalisation, matching or layering changes in a way the parts below may not show.
PROMPT_RULES_VERSION = 3
# One of each thing `normalize` folds: look-alikes, diacritics, invisible and filler characters, full-width and
# regional-indicator letters, blanks, and weight syntax.
_NORMALIZE_PROBE = (
    "Nᴜdé\u200bЅех ΑΒΕ ᴀʙᴄ ｎｕｄｅ \U0001f1f3\U0001f1fa n\u3164u\u2800d\te (gore:1.3) [b\u00adlood:.8] <lora:x:0.7> ß ﬁ"
    " n.u.d.e nu-de n_u_d_e nuuuude eꓣꓳꓔꓲꓚ ոսժe 70pl3$$ 非暴力 누드"
)
_CHUNK_BYTES = 8 * 1024 * 1024
_LOADED_SUFFIXES = (".json", ".txt", ".safetensors")  # the checker loads with use_safetensors=True
LENGTH = 16  # hex characters (64 bits): plenty to tell policies apart, short in a log line


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _tree_digest(root: Path) -> str | None:
    """SHA-256 over the relative names and contents of the files under `root` that the checker loads (configs,
    vocabularies, safetensors; not hidden ones such as a hub download cache); None when it is not a folder."""
    if not root.is_dir():
        return None
    h = hashlib.sha256()
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.name.endswith(_LOADED_SUFFIXES)
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    for path in files:
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + _file_digest(path).encode() + b"\0")
    return h.hexdigest()


def _prompt_part(settings: SafetySettings) -> dict:
    policy = prompt.PromptPolicy(extra_terms=settings.extra_terms)
    folded = normalize.fold(_NORMALIZE_PROBE)
    return {"version": PROMPT_RULES_VERSION, "layers": list(prompt.LAYERS),
            "lexicon": policy.lexicon.describe(),
            "normalize": {"probe": folded, "views": [list(v) for v in normalize.views(folded)],
                          "confusables": normalize.table_digest()},
            "semantic": policy.semantic.describe() if policy.semantic is not None else None}


def _nudenet_model() -> str | None:
    """The hash of the detector NudeNet's wheel ships, found without importing nudenet (onnxruntime, cv2)."""
    spec = importlib.util.find_spec("nudenet")
    if spec is None or spec.origin is None:
        return None
    model = Path(spec.origin).with_name("320n.onnx")
    return _file_digest(model) if model.is_file() else None


def _image_part(settings: SafetySettings) -> dict:
    checker = None
    if settings.checker_dir is not None:
        root = image.checker_root(settings.checker_dir)  # a hub id: its snapshot in the local cache
        checker = {sub: _tree_digest(root / sub) for sub in ("safety_checker", "feature_extractor")}
    nudenet = image._NudeNet  # its scores decide what it reports
    return {
        "nudenet": {
            "model": _nudenet_model(),
            "blocking_labels": sorted(image._EXPOSED_CLASSES),
            "scores": [nudenet.MIN_SCORE, nudenet.NMS_SCORE, nudenet.NMS_IOU],
            "threshold": settings.nsfw_threshold,
        },
        "sd_checker": checker,  # None: not run
    }


def policy_description(settings: SafetySettings | None = None) -> dict:
    """What the fingerprint hashes, as plain JSON values (for a log line or a test that wants to see why)."""
    settings = settings or SafetySettings()
    return {"prompt": _prompt_part(settings), "image": _image_part(settings),
            "postprocess": postprocess.POSTPROCESS_VERSION}


def policy_fingerprint(settings: SafetySettings | None = None) -> str:
    """A short, stable hash of the safety policy these settings (and this code) enforce; see the module doc."""
    body = json.dumps(policy_description(settings), sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()[:LENGTH]
