import argparse
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw
from pydantic import ValidationError

from skillgen.safety import (
    Decision,
    ImagePolicy,
    PromptPolicy,
    SafetyError,
    SafetySettings,
    add_arguments,
    run,
)
from skillgen.safety.image import _NudeNet, nudenet_providers

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
SEXUAL = "Your prompt was blocked: it asks for sexual content or nudity."
VIOLENCE = "Your prompt was blocked: it asks for graphic violence or gore."
WEAPONS = "Your prompt was blocked: it uses a term this workspace does not allow (weapons)."


def with_ref(reason: str) -> str:
    """A reason as refusals now end it (issue 15): the sentence, then a reference id."""
    return re.escape(reason) + r" \(ref [0-9a-f]{8}\)"


@pytest.fixture(scope="module")
def prompts() -> PromptPolicy:
    return PromptPolicy()


@pytest.mark.parametrize(
    "prompt",
    [
        "nude",
        "n\u200bude",  # zero-width space
        "nu\u00adde",  # soft hyphen
        "n\u2060u\ufeffd\u200de",  # word joiner, BOM, zero-width joiner
        "ｎｕｄｅ",  # fullwidth
        "nudе",  # Cyrillic е
        "nυdε",  # Greek upsilon and epsilon
        "ɴᴜᴅᴇ",  # small capitals
        "𝐧𝐮𝐝𝐞",  # mathematical bold
        "nüdé",  # diacritics
        "N\u0336U\u0336D\u0336E",  # combining strike-through
        "n.u.d.e",
        "n u d e",
        "a n-u-d-e woman",
        "n_u_d_e",
        "nud3",
        "p0rn",
        "s3x!",
        "$ex",
        "n!pples",
        "(nude:1.3)",
        "[nude:0.8]",
        "(n:1.1)(u:1.1)(d:1.1)(e:1.1)",
        "(((NUDE)))",
        "NUDE",
        "a nude2 figure",
        "一个nude女人",
        "photo, Topless, beach",
    ],
)
def test_sexual_evasions_are_blocked(prompts: PromptPolicy, prompt: str) -> None:
    decision = prompts.check(prompt)
    assert (decision.allowed, decision.category, decision.layer) == (False, "sexual", "lexicon")
    assert re.fullmatch(with_ref(SEXUAL), decision.reason) and decision.reason.endswith(f"(ref {decision.ref})")


@pytest.mark.parametrize(
    "prompt",
    ["GORE", "g0r3", "g o r e", "graphic violence", "Graphic_Violence", "graphic-violence", "a severed   head"],
)
def test_violence_evasions_are_blocked(prompts: PromptPolicy, prompt: str) -> None:
    decision = prompts.check(prompt)
    assert (decision.allowed, decision.category) == (False, "violence")
    assert re.fullmatch(with_ref(VIOLENCE), decision.reason)


@pytest.mark.parametrize(
    ("prompt", "category"),
    [
        ("暴力", "violence"),
        ("一个充满暴力的场面", "violence"),  # substring inside a longer run of Han characters
        ("血腥的战场", "violence"),
        ("斬首", "violence"),  # traditional
        ("裸露", "sexual"),
        ("裸体的女人", "sexual"),
        ("裸體", "sexual"),  # traditional
        ("裸\u200b露", "sexual"),
        ("裸 露", "sexual"),
        ("裸.露", "sexual"),
    ],
)
def test_chinese_terms_match_as_substrings(prompts: PromptPolicy, prompt: str, category: str) -> None:
    decision = prompts.check(prompt)
    assert (decision.allowed, decision.category) == (False, category)


@pytest.mark.parametrize(
    "prompt",
    [
        "Essex",
        "Sussex countryside, unisex jacket, a sexton",
        "Scunthorpe",
        "therapist",
        "a bunch of grapes, grape vine",
        "rapeseed field",
        "cocktail",
        "assassin's creed",
        "a violinist's bow hold, close-up",
        "4k 3d render, 1920s, version 1.5, (masterpiece:1.2)",
        "U.S.A. flag",
        "summa cum laude",
        "一只可爱的猫",
        "",
    ],
)
def test_innocent_prompts_pass(prompts: PromptPolicy, prompt: str) -> None:
    assert prompts.check(prompt) == Decision(allowed=True)


_INVISIBLE = st.sampled_from(["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u202e", "\u180e"])


@settings(max_examples=60, deadline=None)
@given(
    term=st.sampled_from(["nude", "porn", "gore", "graphic violence", "暴力", "裸露"]),
    invisible=st.lists(_INVISIBLE, min_size=16, max_size=16),
    upper=st.lists(st.booleans(), min_size=16, max_size=16),
)
def test_case_and_invisible_characters_never_unblock(
    prompts: PromptPolicy, term: str, invisible: list[str], upper: list[bool]
) -> None:
    n = len(term)
    cased = (ch.upper() if up else ch for ch, up in zip(term, upper[:n], strict=True))
    disguised = "".join(ch + inv for ch, inv in zip(cased, invisible[:n], strict=True))
    assert not prompts.check(f"a photo, {disguised}, 8k").allowed


def test_extra_term_files_add_categories(tmp_path: Path, prompts: PromptPolicy) -> None:
    weapons = tmp_path / "weapons.team.txt"
    weapons.write_text("# our own list\n\nflamethrower\n  火焰喷射器  \n", encoding="utf-8")
    policy = PromptPolicy(extra_terms=[weapons])

    decision = policy.check("a knight with a FLAMETHROWER")
    assert decision.category == "weapons"
    assert re.fullmatch(with_ref(WEAPONS), decision.reason)
    assert policy.check("骑士拿着火焰喷射器").category == "weapons"
    assert policy.check("nude").category == "sexual"  # defaults stay
    assert prompts.check("a knight with a flamethrower").allowed


def test_extra_term_files_come_from_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = tmp_path / "weapons.txt", tmp_path / "drugs.en.txt"
    first.write_text("flamethrower\n", encoding="utf-8")
    second.write_text("cocaine\n", encoding="utf-8")
    monkeypatch.setenv("SKILL_SAFETY_EXTRA_TERMS", f"{first}, {second}")

    policy = PromptPolicy.from_settings()
    assert policy.check("flamethrower").category == "weapons"
    assert policy.check("cocaine").category == "drugs"


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("missing.txt", None, "cannot read term list"),
        ("Bad Name.txt", "word\n", "name it <category>"),
        ("punct.txt", "ok\n!!!\n", "punct.txt:2"),
        ("latin1.txt", b"caf\xe9\n", "cannot read term list"),
    ],
)
def test_bad_term_files_fail_loudly(tmp_path: Path, name: str, text: str | bytes | None, message: str) -> None:
    path = tmp_path / name
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    elif isinstance(text, bytes):
        path.write_bytes(text)
    with pytest.raises(SafetyError, match=message):
        PromptPolicy(extra_terms=[path])


def test_blocked_decisions_must_say_why() -> None:
    with pytest.raises(ValidationError):
        Decision(allowed=False)
    with pytest.raises(ValidationError):
        Decision(allowed=True, reason="fine")


def _cli_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_prints_one_verdict_per_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = tmp_path / "weapons.txt"
    extra.write_text("flamethrower\n", encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", io.StringIO("a cat\nn u d e\n\n暴力\nflamethrower\n"))

    assert run(_cli_args("--extra-terms", str(extra))) == 0

    lines = capsys.readouterr().out.split("\n")
    expected = ["allow", f"block\t{with_ref(SEXUAL)}", "allow", f"block\t{with_ref(VIOLENCE)}", f"block\t{with_ref(WEAPONS)}", ""]
    assert len(lines) == len(expected)
    for line, pattern in zip(lines, expected):
        assert re.fullmatch(pattern if pattern.startswith("block") else re.escape(pattern), line), (line, pattern)


def test_cli_reports_a_bad_term_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("a cat\n"))
    assert run(_cli_args("--extra-terms", str(tmp_path / "nope.txt"))) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "nope.txt" in captured.err


def test_cli_reads_utf8_whatever_the_environment_says() -> None:
    # Also proves the prompt policy imports and runs without the heavy ML stack.
    heavy = ["torch", "diffusers", "transformers", "onnxruntime", "cv2", "nudenet"]
    code = (
        "import argparse, sys\n"
        "from skillgen.safety import add_arguments, run\n"
        "p = argparse.ArgumentParser(); add_arguments(p)\n"
        "code = run(p.parse_args([]))\n"
        f"loaded = [m for m in {heavy!r} if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "sys.exit(code)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKILL_", "PYTHON"))}
    env.update(LC_ALL="C", PYTHONIOENCODING="latin-1", PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-c", code],
        input="裸露\nok\n".encode(),
        capture_output=True,
        env=env,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert re.fullmatch(f"block\t{with_ref(SEXUAL)}\nallow\n", result.stdout.decode("utf-8"))


# Image policy


def _shapes() -> Image.Image:
    image = Image.new("RGB", (256, 256), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((30, 30, 120, 120), fill="red")
    draw.rectangle((130, 130, 220, 200), fill="blue")
    draw.polygon([(20, 200), (100, 250), (60, 160)], fill="green")
    return image


def _skin_disc() -> Image.Image:
    # NudeNet reads a plain skin-toned disc as BUTTOCKS_EXPOSED with a score near 0.42.
    image = Image.new("RGB", (256, 256), "white")
    ImageDraw.Draw(image).ellipse((48, 48, 208, 208), fill=(224, 172, 105))
    return image


@pytest.fixture(scope="module")
def images() -> ImagePolicy:
    return ImagePolicy()


def test_plain_shapes_pass_at_the_default_threshold(images: ImagePolicy) -> None:
    assert images.check([_shapes(), _skin_disc()]) == [Decision(allowed=True)] * 2


def test_threshold_is_applied() -> None:
    [decision] = ImagePolicy(nsfw_threshold=0.3).check([_skin_disc()])
    assert (decision.allowed, decision.category, decision.layer) == (False, "sexual", "nudenet")
    assert re.fullmatch(with_ref("Your image was blocked: it appears to show nudity."), decision.reason)
    assert decision.detail is not None and decision.detail.startswith("nudenet BUTTOCKS_EXPOSED 0.")


@pytest.mark.parametrize("threshold", [0.1, 1.5])
def test_threshold_out_of_range_is_refused(threshold: float) -> None:
    with pytest.raises(SafetyError, match="nsfw_threshold"):
        ImagePolicy(nsfw_threshold=threshold)


def test_threshold_comes_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKILL_SAFETY_NSFW_THRESHOLD", "0.3")
    assert not ImagePolicy.from_settings().check([_skin_disc()])[0].allowed


def test_one_decision_per_image_and_a_failing_image_fails_closed(images: ImagePolicy) -> None:
    broken = Image.new("RGB", (0, 0))  # NudeNet's OpenCV preprocessing raises on an empty image
    decisions = images.check([_shapes(), broken, _shapes().convert("RGBA"), _shapes().convert("L")])

    assert [d.allowed for d in decisions] == [True, False, True, True]
    assert decisions[1].category == "check_failed"
    assert re.fullmatch(with_ref(
        "Your image was withheld: the safety check could not run, so nothing was shown. Please try again."
    ), decisions[1].reason)


def test_detector_error_blocks_every_image(images: ImagePolicy, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", fail)
    decisions = images.check([_shapes(), _shapes()])
    assert [(d.allowed, d.category, d.detail) for d in decisions] == [
        (False, "check_failed", "RuntimeError: CUDA error: out of memory")
    ] * 2


def test_no_images_no_decisions(images: ImagePolicy) -> None:
    assert images.check([]) == []


def test_our_nudenet_decoding_equals_nudenets_own() -> None:
    from nudenet import nudenet

    detector = _NudeNet("cpu")
    rng = np.random.default_rng(1)
    found = 0
    for _ in range(10):
        output = rng.random((1, 22, 2100), dtype=np.float32)
        output[0, :4] *= 320
        output[0, 4:] **= 4  # most candidates under NudeNet's 0.2, some over
        width, height = (int(v) for v in rng.integers(16, 1024, 2))
        side = max(width, height)
        theirs = nudenet._postprocess([output], side - width, side - height, side / width, side / height,
                                      width, height, 320, 320)
        assert detector.decode([output], side - width, side - height, width, height) == theirs
        found += len(theirs)
    assert found > 1000  # the comparison covered many boxes, overlapping ones included


def test_our_nudenet_detects_what_nudedetector_detects() -> None:
    from nudenet import NudeDetector

    ours, theirs = _NudeNet("cpu"), NudeDetector()
    pictures = [_shapes(), _skin_disc(), _skin_disc().resize((97, 300)), _shapes().resize((640, 64))]
    detections = [theirs.detect(np.asarray(p)) for p in pictures]
    assert [ours.detect(np.asarray(p)) for p in pictures] == detections
    assert any(d["class"] == "BUTTOCKS_EXPOSED" for found in detections for d in found)


@pytest.mark.parametrize(
    ("device", "available", "chosen"),
    [
        ("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]),
        ("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]),
        ("cpu", ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]),
        ("cuda", ["CPUExecutionProvider"], ["CPUExecutionProvider"]),
    ],
)
def test_nudenet_runs_on_the_consumers_gpu_when_onnxruntime_has_cuda(device, available, chosen) -> None:
    assert nudenet_providers(device, available) == chosen


def test_a_cpu_consumer_runs_nudenet_on_the_cpu() -> None:
    assert _NudeNet("cpu").providers == ["CPUExecutionProvider"]


# StableDiffusionSafetyChecker, tiny and random, built offline


def _save_tiny_checker(root: Path, concept_threshold: float) -> Path:
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 64,
            "max_position_embeddings": 16,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=8,
    )
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(config)
    # A concept fires when cosine similarity exceeds its threshold: below -1 every image is flagged,
    # above 1 none is, so the real forward pass decides without trained weights.
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(concept_threshold)
        checker.special_care_embeds_weights.fill_(concept_threshold)
    checker.save_pretrained(root / "safety_checker")
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(root / "feature_extractor")
    return root


@pytest.fixture(scope="module")
def checker_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        "flags_all": _save_tiny_checker(tmp_path_factory.mktemp("flags_all"), -2.0),
        "flags_none": _save_tiny_checker(tmp_path_factory.mktemp("flags_none"), 2.0),
    }


def test_stable_diffusion_checker_runs_and_passes(checker_dirs: dict[str, Path]) -> None:
    policy = ImagePolicy(checker_dir=checker_dirs["flags_none"], device="auto")
    assert policy.check([_shapes(), _shapes().resize((512, 384))]) == [Decision(allowed=True)] * 2


def test_stable_diffusion_checker_blocks_what_it_flags(
    checker_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SKILL_SAFETY_CHECKER_DIR", str(checker_dirs["flags_all"]))
    decisions = ImagePolicy.from_settings(SafetySettings()).check([_shapes(), _shapes()])
    assert [(d.allowed, d.category, d.layer) for d in decisions] == [(False, "sexual", "sd_checker")] * 2
    flagged = "Your image was blocked: the safety checker flagged it as not safe for work."
    assert all(re.fullmatch(with_ref(flagged), d.reason) for d in decisions)


def test_stable_diffusion_checker_error_fails_closed(
    checker_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )

    policy = ImagePolicy(checker_dir=checker_dirs["flags_none"])

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("device-side assert")

    monkeypatch.setattr(StableDiffusionSafetyChecker, "forward", fail)
    [decision] = policy.check([_shapes()])
    assert (decision.allowed, decision.category) == (False, "check_failed")


def test_checker_dir_without_weights_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SafetyError, match="safety_checker/"):
        ImagePolicy(checker_dir=tmp_path)
