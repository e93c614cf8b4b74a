"""`skillgen safety explain "<prompt>" [--negative "<negative>"]`: each layer's verdict on one prompt.

    $ skillgen safety explain "a nudewoman on the beach"
    normalise  pass   prompt 'a nudewoman on the beach'
    lexicon    BLOCK  sexual: glued 'nude' in 'nudewoman'
    negative   pass   no negative prompt
    semantic   pass   score/threshold sexual 0.412/0.759, violence 0.010/0.667
    verdict    BLOCK  sexual (lexicon): Your prompt was blocked: it asks for sexual content or nudity. (ref 3fa9c2d1)

Every layer runs (no early exit), so an operator sees what each one makes of the prompt; the verdict is what
`check` decides. Exit status 0 either way (2 when the term lists cannot load).
"""

from __future__ import annotations

import argparse

from skillgen.safety.cli import add_arguments as add_term_arguments
from skillgen.safety.cli import policy_from, utf8_stdio


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the prompt to explain")
    parser.add_argument("--negative", "--no", default="", help="its negative prompt")
    add_term_arguments(parser)


def lines(policy, prompt: str, negative: str = "") -> list[str]:
    out = []
    for v in policy.explain(prompt, negative):
        what = f"{v.category}: {v.detail}" if v.blocked else v.detail
        out.append(f"{v.layer:<10} {'BLOCK' if v.blocked else 'pass':<6} {what}")
    decision = policy.check(prompt, negative)
    if decision.allowed:
        out.append(f"{'verdict':<10} {'allow':<6}")
    else:
        out.append(f"{'verdict':<10} {'BLOCK':<6} {decision.category} ({decision.layer}): {decision.reason}")
    return out


def run(args: argparse.Namespace) -> int:
    policy = policy_from(args, "explain")
    if policy is None:
        return 2
    utf8_stdio()
    print("\n".join(lines(policy, args.prompt, args.negative)))
    return 0
