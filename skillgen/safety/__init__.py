"""Safety, fail closed: a prompt policy for every request and an image policy for every output.

`PromptPolicy` is a layered filter (normalise, lexicon, negative prompt, semantic; see prompt.py and
docs/safety.md) in Python and numpy, importing nothing heavy, so the bots run it early too; the consumer stays
authoritative. `ImagePolicy` loads its checkers when built (see image.py).
"""

from skillgen.safety.cli import add_arguments, run
from skillgen.safety.decision import Decision
from skillgen.safety.errors import SafetyError
from skillgen.safety.image import ImagePolicy
from skillgen.safety.prompt import PromptPolicy
from skillgen.safety.settings import SafetySettings

__all__ = ["Decision", "ImagePolicy", "PromptPolicy", "SafetyError", "SafetySettings", "add_arguments", "run"]
