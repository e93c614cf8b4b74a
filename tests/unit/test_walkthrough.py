"""docs/walkthrough.md is what docs/walkthrough.py writes from the code the bots and delivery run (so it says what a
person really sees), and it walks every step on Discord and Slack, in English and Chinese."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

DOCS = Path(__file__).resolve().parents[2] / "docs"


def generator():
    spec = importlib.util.spec_from_file_location("docs_walkthrough", DOCS / "walkthrough.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up there)
    spec.loader.exec_module(module)  # no side effects: only main() writes
    return module


@pytest.fixture(scope="module")
def walkthrough():
    module = generator()
    return module, module.walkthrough()


def sections(text: str) -> dict[str, str]:
    """Each `## ` section's body, by its heading."""
    parts = re.split(r"^## (.+)$", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def test_the_committed_walkthrough_is_what_the_code_says(walkthrough):
    _, text = walkthrough
    committed = (DOCS / "walkthrough.md").read_text(encoding="utf-8")
    assert text == committed, "docs/walkthrough.md is out of date: run docs/walkthrough.py"


def test_every_step_is_walked_on_both_platforms_in_both_languages(walkthrough):
    module, text = walkthrough
    found = sections(text)
    assert set(found) == {f"{platform} · {title}" for platform in ("Discord", "Slack")
                          for title in module.TITLE.values()}
    for heading, body in found.items():
        platform, _, title = heading.partition(" · ")
        lang = next(code for code, name in module.TITLE.items() if name == title)
        steps = re.findall(rf"^### {platform} · {lang} · \d+\. (.+)$", body, flags=re.MULTILINE)
        assert steps == list(module.STEPS), heading
        for step in re.split(r"^### .+$", body, flags=re.MULTILINE)[1:]:
            assert "````text" in step or "- Title:" in step, f"a step of {heading} shows no message"


def test_each_language_speaks_its_own_and_each_platform_its_markup(walkthrough):
    _, text = walkthrough
    found = sections(text)
    for heading, body in found.items():
        chinese = "中文" in heading
        assert ("已排队" in body) == chinese and ("queued (2 images)" in body) != chinese, heading
        assert ("正在取消…" if chinese else "Cancelling…") in body
        assert ("你已有 5 个请求在等待" if chinese else "you already have 5 requests waiting") in body
        assert ("只有发起请求的人可以取消。" if chinese else "Only the person who asked can cancel this.") in body
        assert ("繁忙：约有 40 分钟" if chinese else "busy: about 40 min") in body
        # Buttons in the requester's language; U1-U4 and V1-V4 the same in every language.
        if chinese:
            assert "`[重新生成] [变体] [改写重绘] [参数] [删除]`" in body
            assert "`[取消]`" in body and "`[放大 2 倍] [变化]`" in body and "`[Cancel]`" not in body
        else:
            assert "`[Re-roll] [Variations] [Remix] [Parameters] [Delete]`" in body
            assert "`[Cancel]`" in body and "`[Upscale 2x] [Vary]`" in body
        assert ("未知选项 --colour" if chinese else "unknown option --colour") in body  # the grammar's refusal
        assert ("画一张技能图并发在这里" if chinese else "draws a skill image and posts it here") in body  # the help
        if heading.startswith("Discord"):
            # The command as the reader's client names it: Discord shows a Chinese client its Chinese name.
            assert ("`/技能图 提示词:help`" if chinese else "`/skill prompt:help`") in body
            assert ("**/技能图** 画一张技能图" if chinese else "**/skill** draws") in body
            assert "<t:1796547600:R>" in body and "`[U1] [U2]`" in body and "`[V1] [V2]`" in body
            assert "<!date^" not in body
        else:
            assert "<!date^1796547600^{time}|09:00 UTC>" in body and "`[U1] [U2] [V1] [V2]`" in body
            assert "<t:" not in body


def test_main_writes_the_file(walkthrough, tmp_path, monkeypatch):
    module, text = walkthrough
    monkeypatch.setattr(module, "OUT", tmp_path / "walkthrough.md")
    assert module.main() == 0
    assert (tmp_path / "walkthrough.md").read_text(encoding="utf-8") == text
