"""Issue 15's layered prompt policy, layer by layer: normaliser, lexicon, negative prompt, semantic layer, and
transparency (reference ids, the audit log, `skillgen safety explain`, the CLI's tab contract)."""

import argparse
import io
import json
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from skillgen.safety import PromptPolicy, SafetySettings
from skillgen.safety import explain as explain_cli
from skillgen.safety.cli import add_arguments, run
from skillgen.safety.normalize import fold, views
from skillgen.safety.semantic import WEIGHTS, SemanticModel, default_model

pytestmark = pytest.mark.unit

REF = re.compile(r" \(ref ([0-9a-f]{8})\)$")


@pytest.fixture(scope="module")
def policy() -> PromptPolicy:
    return PromptPolicy()


@pytest.fixture(scope="module")
def lists_only() -> PromptPolicy:
    return PromptPolicy(semantic=False)


def readings(text: str) -> set[str]:
    return {" ".join(v) for v in views(fold(text))}


# -- layer 1: the normaliser, one case per bypass class ---------------------------------------------------


@pytest.mark.parametrize(
    ("written", "read"),
    [
        ("Ꭺ ꓠꓴꓓꓰ", "a nude"),  # Cherokee, Lisu: confusables.txt skeleton
        ("ոսժe", "nude"),  # Armenian
        ("𝐧𝐮𝐝𝐞 ｎｕｄｅ", "nude nude"),  # NFKC
        ("NuDe", "nude"),  # case folding
        ("eꓣꓳꓔꓲꓚ", "erotic"),  # a stroke look-alike reads as i (and as l)
    ],
)
def test_the_normaliser_folds_other_scripts_to_their_skeleton(written: str, read: str) -> None:
    assert read in readings(written)


@pytest.mark.parametrize("written", ["n.u.d.e", "nu-de", "n_u_d_e", "n*u*d*e", "nu·de", "n'u'd'e", "(n:1.1)(u:1.1)(d:1.1)(e:1.1)"])
def test_separators_inside_a_word_are_removed(written: str) -> None:
    assert "nude" in readings(written)


@pytest.mark.parametrize("written", ["nuuuuude", "nuuude", "NUUUUDE"])
def test_repeated_letters_are_squeezed(written: str) -> None:
    assert "nude" in readings(written)


def test_a_repeat_squeezes_to_a_double_letter_too() -> None:
    assert "blood" in readings("bloooooood")


@pytest.mark.parametrize(("written", "read"), [("p0rn", "porn"), ("$ex", "sex"), ("70pl3$$", "topless"), ("n!pples", "nipples")])
def test_leetspeak_is_read_as_letters(written: str, read: str) -> None:
    assert read in readings(written)


def test_the_normaliser_leaves_han_kana_and_hangul_alone() -> None:
    assert fold("暴力 ヌード 누드 が") == "暴力 ヌード 누드 が"


# -- layer 2: the lexicon -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "category"),
    [
        ("a nudewoman on the beach", "sexual"),
        ("hotsexscene", "sexual"),
        ("nakedgirl portrait", "sexual"),
        ("bloodsoaked warrior", "violence"),
        ("gorefest poster", "violence"),
        ("nu de", "sexual"),  # a word split in two
        ("a n u d e figure", "sexual"),  # spaced out after a one-letter word: "anude" is no word, "nude" is
        ("a g o r e scene", "violence"),
    ],
)
def test_glued_and_split_terms_are_found(lists_only: PromptPolicy, prompt: str, category: str) -> None:
    decision = lists_only.check(prompt)
    assert (decision.allowed, decision.category, decision.layer) == (False, category, "lexicon")


@pytest.mark.parametrize(
    "prompt",
    ["Essex", "Scunthorpe", "a therapist", "cocktail", "data analysis", "Sussex", "grape", "grapes", "Middlesex",
     "a sexton", "rapeseed", "skillful", "peacock", "cucumber", "summa cum laude", "Gore-Tex jacket", "Al Gore",
     "nude lipstick", "naked eye", "bottomless brunch", "a manslaughter trial", "Nacktschnecke", "성기사",
     "裸露的岩石", "血腥玛丽", "グローブ", "ミケランジェロ", "кровавая мэри", "попытка", "árboles desnudos"],
)
def test_allowlisted_words_are_not_blocked_even_glued(policy: PromptPolicy, prompt: str) -> None:
    assert policy.check(prompt).allowed, policy.explain(prompt)


@pytest.mark.parametrize(
    "prompt",
    ["非暴力抵抗", "non-violent protest", "nonviolent", "gewaltfreie Kommunikation", "sin violencia",
     "ненасильственный протест", "비폭력 시위", "反对家庭暴力的海报", "a cartoon, no gore", "gore-free zombie cartoon",
     "非暴力の抵抗", "protesto não violento", "une fête sans violence"],
)
def test_negated_terms_do_not_block(policy: PromptPolicy, prompt: str) -> None:
    assert policy.check(prompt).allowed, policy.explain(prompt)


@pytest.mark.parametrize(
    ("prompt", "category"),
    [
        ("mutilating the body", "violence"), ("he beheads the king", "violence"),
        ("decapitating a prisoner", "violence"), ("dismembering", "violence"), ("disembowelling", "violence"),
        ("massacring villagers", "violence"), ("torturing", "violence"), ("strippers", "sexual"),
    ],
)
def test_unlisted_inflections_are_found(lists_only: PromptPolicy, prompt: str, category: str) -> None:
    assert lists_only.check(prompt).category == category


@pytest.mark.parametrize(
    ("prompt", "category"),
    [
        ("一丝不挂的美女", "sexual"), ("血肉模糊的尸体", "violence"),  # zh
        ("ヌードの女性", "sexual"), ("血まみれの死体", "violence"),  # ja
        ("알몸의 남자", "sexual"), ("피투성이 시체", "violence"),  # ko
        ("eine nackte Frau", "sexual"), ("enthaupteter Soldat", "violence"),  # de
        ("une femme nue", "sexual"), ("un cadavre décapité", "violence"),  # fr
        ("una mujer desnuda", "sexual"), ("cadáver desmembrado", "violence"),  # es
        ("голая девушка", "sexual"), ("обезглавленный солдат", "violence"),  # ru
        ("mulher nua", "sexual"), ("corpo esquartejado", "violence"),  # pt
        ("a woman in her birthday suit", "sexual"), ("a pool of blood", "violence"),  # en euphemisms
        ("a woman without any garments", "sexual"), ("没有衣服的女人", "sexual"),  # clothing negated in the prompt
    ],
)
def test_every_language_and_euphemism_is_covered(lists_only: PromptPolicy, prompt: str, category: str) -> None:
    decision = lists_only.check(prompt)
    assert (decision.allowed, decision.category) == (False, category)


def test_homoglyphs_inside_a_foreign_word_are_caught(lists_only: PromptPolicy) -> None:
    assert not lists_only.check("гoлая девушка").allowed  # Latin o inside Russian


# -- layer 3: the negative prompt ---------------------------------------------------------------------------


@pytest.mark.parametrize("negative", ["clothes", "no clothes", "shirt", "no shirt", "ohne Kleidung", "ropa", "衣服",
                                      "下着", "bra, underwear", "censored, mosaic", "(clothes:1.5)"])
def test_taking_clothing_away_in_the_negative_prompt_is_refused(policy: PromptPolicy, negative: str) -> None:
    decision = policy.check("a portrait of a woman in a park", negative)
    assert (decision.allowed, decision.category, decision.layer) == (False, "sexual", "negative")
    assert "negative prompt" in decision.reason


def test_a_negated_blocked_term_in_the_negative_prompt_is_refused(policy: PromptPolicy) -> None:
    decision = policy.check("a family photo", "no nudity")
    assert (decision.allowed, decision.layer) == (False, "negative")


@pytest.mark.parametrize("negative", ["nsfw, nude, blurry", "gore, blood", "blurry, lowres, bad anatomy", "hat, sunglasses", ""])
def test_steering_away_in_the_negative_prompt_is_fine(policy: PromptPolicy, negative: str) -> None:
    assert policy.check("a portrait of a woman in a park", negative).allowed


def test_check_without_a_negative_prompt_still_works(policy: PromptPolicy) -> None:
    assert policy.check("a cat").allowed and not policy.check("a nude cat person").allowed


# -- layer 4: the semantic layer ----------------------------------------------------------------------------


def test_the_weights_load_without_pickle() -> None:
    with zipfile.ZipFile(WEIGHTS) as z:  # an .npz: plain .npy arrays, none of them object arrays
        assert all(name.endswith(".npy") for name in z.namelist())
    with np.load(WEIGHTS, allow_pickle=False) as data:
        assert {"categories", "weights", "bias", "thresholds", "bits"} <= set(data.files)
    model = SemanticModel.load()
    assert model.categories == ("sexual", "violence") and model.weights.shape == (2, 1 << model.bits)
    assert all(0.5 <= t < 1 for t in model.thresholds)


@pytest.mark.parametrize(
    ("prompt", "category"),
    [
        ("a woman lying on silk sheets with nothing covering her", "sexual"),
        ("explicit adult scene in a bedroom", "sexual"),
        ("the victim's body torn apart, blood spraying on the wall", "violence"),
        ("brutal murder with blood and bones everywhere", "violence"),
        ("a pile of bloody bodies", "violence"),
    ],
)
def test_the_semantic_layer_flags_paraphrases_the_lists_miss(prompt: str, category: str) -> None:
    model = default_model()
    scores = model.scores(prompt)
    assert scores[category] >= model.thresholds[model.categories.index(category)], scores
    assert PromptPolicy(semantic=True).check(prompt).category == category


@pytest.mark.parametrize("prompt", ["a knight in shining armor", "a woman in a red evening dress", "a lighthouse in a storm",
                                    "un chat sur le canapé", "一只可爱的猫", "a zombie costume for halloween, cartoon"])
def test_the_semantic_layer_passes_ordinary_prompts(prompt: str) -> None:
    model = default_model()
    assert model.flagged(model.scores(prompt)) == []


def test_allowlisted_words_do_not_reach_the_semantic_layer(policy: PromptPolicy) -> None:
    assert "naked eye" in policy.masks("visible to the naked eye")
    assert policy.check("visible to the naked eye, astronomy").allowed


# -- transparency: reference ids, the audit log, explain, the CLI -------------------------------------------


def test_every_refusal_carries_a_category_layer_and_reference(policy: PromptPolicy) -> None:
    first, second = policy.check("nude"), policy.check("nude")
    for decision in (first, second):
        match = REF.search(decision.reason)
        assert match and match[1] == decision.ref and decision.category == "sexual" and decision.layer == "lexicon"
    assert first.ref != second.ref  # one id per refusal, not per prompt


def test_refusals_are_audited_as_json_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "audit.jsonl"
    monkeypatch.setenv("SKILL_SAFETY_AUDIT_LOG", str(log))
    audited = PromptPolicy.from_settings(SafetySettings(_env_file=None))
    assert audited.check("a cat").allowed
    blocked = audited.check("N.U.D.E woman", "blurry")
    by_negative = audited.check("a portrait", "clothes")
    lines = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    assert [(r["ref"], r["category"], r["layer"], r["kind"]) for r in lines] == [
        (blocked.ref, "sexual", "lexicon", "prompt"), (by_negative.ref, "sexual", "negative", "prompt")]
    assert lines[0]["text"] == "n.u.d.e woman" and lines[0]["negative"] == "blurry" and "nude" in lines[0]["detail"]
    assert lines[0]["time"].endswith("+00:00")


def test_without_the_setting_nothing_is_audited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SKILL_SAFETY_AUDIT_LOG", raising=False)
    assert SafetySettings(_env_file=None).audit_log is None and PromptPolicy.from_settings().audit is None


def _args(module, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_reads_a_negative_prompt_after_a_tab(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("a portrait\tclothes\na portrait\tblurry\na portrait\nnude\t\n"))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args([])) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:3] == ["allow", "allow"] and len(out) == 4
    assert re.fullmatch(r"block\tYour prompt was blocked: its negative prompt \(--no\) steers toward sexual content "
                        r"or nudity \(it takes clothing away\)\. \(ref [0-9a-f]{8}\)", out[0])
    assert re.fullmatch(r"block\tYour prompt was blocked: it asks for sexual content or nudity\. \(ref [0-9a-f]{8}\)", out[3])


def test_explain_prints_each_layers_verdict(capsys) -> None:
    assert explain_cli.run(_args(explain_cli, "a nudewoman on the beach", "--no", "blurry")) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ["normalise", "lexicon", "negative", "semantic", "verdict"]
    assert out[1].split()[1] == "BLOCK" and "glued 'nude' in 'nudewoman'" in out[1]
    assert out[2].split()[1] == "pass" and out[4].split()[1] == "BLOCK" and REF.search(out[4])
    assert explain_cli.run(_args(explain_cli, "a cat")) == 0
    assert capsys.readouterr().out.splitlines()[-1].split() == ["verdict", "allow"]


def test_the_fingerprint_covers_every_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    from skillgen.safety import fingerprint

    described = fingerprint.policy_description(SafetySettings(_env_file=None))["prompt"]
    assert described["version"] == fingerprint.PROMPT_RULES_VERSION and described["layers"] == ["normalise", "lexicon", "negative", "semantic"]
    assert {"terms", "allow", "negators", "glue", "clothing"} <= set(described["lexicon"])
    assert described["semantic"]["weights"] == default_model().digest and described["normalize"]["confusables"]
    base = fingerprint.policy_fingerprint(SafetySettings(_env_file=None))
    model = default_model()
    stricter = SemanticModel(model.categories, model.weights, model.bias, model.thresholds - 0.1, model.bits, model.digest)
    monkeypatch.setattr("skillgen.safety.prompt.default_model", lambda: stricter)
    assert fingerprint.policy_fingerprint(SafetySettings(_env_file=None)) != base


# -- the image side: references, the audit log, the checker from a hub id -----------------------------------


def test_an_image_refusal_carries_a_reference_and_is_audited(tmp_path: Path) -> None:
    from PIL import Image, ImageDraw

    from skillgen.safety import ImagePolicy

    disc = Image.new("RGB", (256, 256), "white")  # NudeNet reads a skin-toned disc as BUTTOCKS_EXPOSED near 0.42
    ImageDraw.Draw(disc).ellipse((48, 48, 208, 208), fill=(224, 172, 105))
    log = tmp_path / "audit.jsonl"
    [decision] = ImagePolicy(nsfw_threshold=0.3, audit_log=log).check([disc])
    assert decision.layer == "nudenet" and REF.search(decision.reason)[1] == decision.ref
    [line] = [json.loads(x) for x in log.read_text().splitlines()]
    assert (line["ref"], line["kind"], line["layer"], line["category"]) == (decision.ref, "image", "nudenet", "sexual")


def test_the_sd_checker_setting_takes_a_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    from skillgen.safety.image import checker_root

    snapshot = tmp_path / "snapshot"
    calls = []

    def fake_snapshot(repo_id, allow_patterns, local_files_only):
        calls.append((repo_id, local_files_only))
        if repo_id != "org/sd-1":
            raise OSError("no such repository")
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert checker_root("org/sd-1", download=True) == snapshot
    assert checker_root("org/sd-1") == snapshot  # the fingerprint reads the local cache only
    assert calls == [("org/sd-1", False), ("org/sd-1", True)]
    assert checker_root(tmp_path) == tmp_path  # a local folder is itself
    assert checker_root("no/such") == Path("no/such")  # the caller's folder check names it
