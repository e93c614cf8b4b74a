"""skillgen.runtime.paths.under: a path built from message data stays strictly inside its root."""

from __future__ import annotations

import pytest

from skillgen.runtime.paths import under

pytestmark = [pytest.mark.unit, pytest.mark.security]


def test_a_plain_name_lands_inside_the_root(tmp_path):
    assert under(tmp_path, "job-1") == (tmp_path / "job-1").resolve()
    assert under(tmp_path, "job-1", "checkpoint") == (tmp_path / "job-1" / "checkpoint").resolve()
    assert under(tmp_path / "not-yet", "a") == (tmp_path / "not-yet" / "a").resolve()  # nothing need exist


@pytest.mark.parametrize(
    "parts",
    [("..",), ("../victim",), ("a", "..", ".."), ("a/../../victim",), ("..", "x"), ("job/../..",)],
    ids=["dotdot", "dotdot-name", "dotdot-parts", "dotdot-inside", "dotdot-then-name", "climb-back"],
)
def test_dotdot_that_climbs_out_is_refused(tmp_path, parts):
    with pytest.raises(ValueError, match="is not inside"):
        under(tmp_path / "root", *parts)


@pytest.mark.parametrize("parts", [("/etc/passwd",), ("a", "/tmp/x"), ("/",)], ids=["absolute", "absolute-later", "slash"])
def test_an_absolute_part_is_refused(tmp_path, parts):
    with pytest.raises(ValueError, match="is not inside"):
        under(tmp_path / "root", *parts)


@pytest.mark.parametrize("parts", [(), ("",), (".",), ("a/..",)], ids=["none", "empty", "dot", "back-to-root"])
def test_the_root_itself_is_not_strictly_inside(tmp_path, parts):
    with pytest.raises(ValueError):
        under(tmp_path, *parts)


def test_a_slash_inside_a_part_may_go_deeper_but_not_out(tmp_path):
    assert under(tmp_path, "a/b") == (tmp_path / "a" / "b").resolve()
    with pytest.raises(ValueError):
        under(tmp_path / "root", "a/../../b")


def test_a_symlink_inside_the_root_that_points_out_is_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "passwd").symlink_to("/etc/passwd")
    for parts in (("escape",), ("escape", "file"), ("passwd",)):
        with pytest.raises(ValueError, match="is not inside"):
            under(root, *parts)


def test_a_symlink_that_stays_inside_is_followed(tmp_path):
    root = tmp_path / "root"
    (root / "real").mkdir(parents=True)
    (root / "alias").symlink_to(root / "real", target_is_directory=True)
    assert under(root, "alias", "x") == (root / "real" / "x").resolve()


def test_a_symlinked_root_is_resolved_first(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    assert under(tmp_path / "link", "job") == (tmp_path / "real" / "job").resolve()


def test_a_nul_byte_is_refused(tmp_path):
    with pytest.raises(ValueError):
        under(tmp_path, "a\0b")
