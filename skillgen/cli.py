"""`skillgen`: one entry point, one subcommand per service or tool.

Each command's module is imported only when that command runs, so `skillgen bot slack` never imports torch
and `skillgen --help` is instant. A module backs a command with `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command path -> (module, one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("demo",): ("skillgen.tools.demo", "run the whole system locally on the embedded default and draw one image"),
    ("consumer",): ("consumer.worker", "GPU consumer: skill.generate -> images -> skill.events"),
    ("bot", "console"): ("bots.console", "local front-end: /skill lines on stdin, PNGs in ./out"),
    ("topics", "ensure"): ("skillgen.runtime.kafka", "create the request, event and dead-letter topics"),
    ("model", "tiny"): ("skillgen.tools.tiny", "build a tiny random Stable Diffusion offline (diffusers format)"),
    ("safety", "check"): ("skillgen.safety", "read prompts (prompt<TAB>negative) on stdin, print allow or block<TAB>reason"),
    ("safety", "explain"): ("skillgen.safety.explain", "print each safety layer's verdict on one prompt"),
    ("safety", "bench"): ("bench.safety", "measure the prompt policy on the labelled test split (block and false-block rates)"),
    ("bot", "discord"): ("bots.discord_bot", "Discord bot: /skill slash command (gateway)"),
    ("bot", "slack"): ("bots.slack_bot", "Slack bot: /skill slash command (Socket Mode or HTTP)"),
    ("bot", "delivery"): ("bots.delivery", "post results from skill.events back to Discord and Slack"),
    ("web",): ("bots.web", "web page front-end (Gradio): /skill in a browser; --embedded runs broker and consumer too"),
    ("trainer",): ("trainer.worker", "LoRA fine-tune worker: skill.finetune -> adapter registry"),
    ("export", "onnx"): ("skillgen.inference.export", "export a diffusers model to ONNX (fp32/fp16/int8)"),
    ("model", "train-icons"): ("skillgen.tools.icon_model", "train the embedded skill-icon model from scratch"),
    ("model", "train-lcm"): ("skillgen.tools.lcm_model", "distill an LCM-LoRA (few-step sampling) for the embedded model"),
    ("bench", "pipeline"): ("bench.pipeline", "benchmark the inference backends side by side"),
    ("bench", "consumer"): ("bench.consumer", "benchmark the consumer service (batching, cache hits)"),
    ("bench", "fairness"): ("bench.fairness", "benchmark fair scheduling, ETA and cancel across teams (issue 17)"),
    ("bench", "trainer"): ("bench.trainer", "benchmark LoRA training quality and speed"),
    ("bench", "quality"): ("bench.quality", "measure how well the embedded model follows colour/background words"),
    ("chaos",): ("bench.chaos", "inject faults into the real services and count lost and duplicate chat posts"),
    ("replay",): ("consumer.replay", "select old requests by time, offsets or ids and list, reprocess or republish them"),
}


def _load(module: str):
    """The command's module. Benchmarks live in the checkout's `bench/` folder, which is not installed: they run
    from a source checkout only."""
    if module.startswith("bench."):
        from skillgen.runtime.settings import REPO_ROOT

        if not (REPO_ROOT / "bench").is_dir():
            raise SystemExit(f"skillgen: benchmarks run from a source checkout (no bench/ folder beside {REPO_ROOT})")
        if str(REPO_ROOT) not in sys.path:
            sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module(module)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one clear line, no usage dump
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, tuple[str, ...] | None]:
    """The parser, with arguments added only for the command that argv names."""
    parser = _Parser(prog="skillgen", description="Skill images on demand: bots -> Kafka -> Stable Diffusion consumers.")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    groups: dict[str, argparse._SubParsersAction] = {}
    chosen = None
    for path, (module, help_) in sorted(COMMANDS.items()):
        if len(path) == 1:
            leaf = subs.add_parser(path[0], help=help_, description=help_)
        else:
            if path[0] not in groups:
                g = subs.add_parser(path[0], help=f"{path[0]} commands")
                groups[path[0]] = g.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", parser_class=_Parser)
            leaf = groups[path[0]].add_parser(path[1], help=help_, description=help_)
        leaf.set_defaults(_module=module, _path=path)
        if list(path) == argv[: len(path)]:
            chosen = path
            _load(module).add_arguments(leaf)
    return parser, chosen


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, chosen = build_parser(argv)
    args = parser.parse_args(argv)
    if chosen is None or not hasattr(args, "_module"):
        parser.print_help()
        return 0 if not argv else 2
    from skillgen.runtime.logs import setup
    from skillgen.runtime.settings import CommonSettings

    try:
        common = CommonSettings()
        setup(common.log_format, common.log_level)
        return int(_load(args._module).run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for the person, the traceback only when asked for
        import os

        if os.environ.get("SKILL_DEBUG"):
            raise
        print(f"skillgen {' '.join(chosen)}: {_one_line(exc)}", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        from schemas.codec import describe

        return f"invalid settings: {describe(exc)} (check the SKILL_* environment variables or .env)"
    from aiokafka.errors import KafkaConnectionError

    if isinstance(exc, KafkaConnectionError):
        return f"cannot reach Kafka ({exc}); is SKILL_KAFKA_BOOTSTRAP right and the broker up?"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
