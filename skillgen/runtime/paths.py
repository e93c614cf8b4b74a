"""File system paths built from message data (a request id, a sink file name): defence in depth behind the
contract, which already refuses ids outside `[A-Za-z0-9_-]`.

    workdir = under(settings.work_dir, req.request_id)

`under` resolves the joined path (symbolic links included, as the operating system would follow them) and
refuses anything that does not land strictly inside the root: `..`, an absolute part, a part with `/` that
climbs out, a symbolic link inside the root that points outside it, and the root itself.
"""

from __future__ import annotations

from pathlib import Path


def under(root: Path, *parts: str) -> Path:
    """`root / parts...`, resolved; ValueError unless it is strictly inside the resolved `root`."""
    base = Path(root).resolve()
    try:
        path = base.joinpath(*parts).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop; (an embedded NUL byte raises ValueError itself)
        raise ValueError(f"{'/'.join(parts)[:80]!r} cannot be resolved under {base}: {exc}") from None
    if base not in path.parents:
        raise ValueError(f"{'/'.join(parts)[:80]!r} is not inside {base}")
    return path
