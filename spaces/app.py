"""A Hugging Face Space (sdk: gradio) that runs skillgen's web page in embedded mode: the embedded broker, one
consumer on SKILL_MODEL (default: the project's shipped 64x64 skill-icon model) and the page, in one process group.

    python spaces/app.py            # here, from a checkout: http://127.0.0.1:7860/
    SKILL_MODEL=... python app.py   # on a Space, where this file sits beside the project (docs/web.md)

Spaces route their public URL to port 7860 on 0.0.0.0, which is the default here when SPACE_ID is set (Spaces set
it); elsewhere the page listens on 127.0.0.1 unless SKILL_WEB_HOST says otherwise. To serve a team's own broker and
consumers instead of the embedded ones, set SKILL_EMBEDDED=0 and the SKILL_* connection variables (docs/web.md).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The project sits beside this file on a Space, one folder up in a checkout; an installed skillgen needs neither.
for root in (HERE, HERE.parent):
    if (root / "skillgen" / "cli.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
        break

from skillgen.cli import main  # noqa: E402  (after the path above)

if __name__ == "__main__":
    on_space = bool(os.environ.get("SPACE_ID"))
    argv = ["web"]
    if os.environ.get("SKILL_EMBEDDED", "1").strip().lower() not in ("0", "false", "no"):
        argv.append("--embedded")
    argv += ["--host", os.environ.get("SKILL_WEB_HOST") or ("0.0.0.0" if on_space else "127.0.0.1")]
    argv += ["--port", os.environ.get("SKILL_WEB_PORT") or os.environ.get("PORT") or "7860"]
    sys.exit(main(argv))
