"""Safety, fail closed: a prompt policy for every request and an image policy for every output.

`PromptPolicy` is pure Python and imports nothing heavy, so the bots run it early too; the
consumer stays authoritative. `ImagePolicy` loads its checkers when built (see image.py).
"""

from consumer.safety.cli import add_arguments, run
from consumer.safety.decision import Decision
from consumer.safety.errors import SafetyError
from consumer.safety.image import ImagePolicy
from consumer.safety.prompt import PromptPolicy
from consumer.safety.settings import SafetySettings

__all__ = ["Decision", "ImagePolicy", "PromptPolicy", "SafetyError", "SafetySettings", "add_arguments", "run"]
