"""`python -m tests.fakes.kill_after_terminal N <skillgen command...>`: run a real skillgen service that SIGKILLs
itself right after its Nth record is answered (the terminal event produced and acknowledged) and before that
record's offset can be committed: the one moment at-least-once delivery has to survive. Production code has no
hook for this; the test injects it here, around the shared service skeleton's `finish`."""

from __future__ import annotations

import logging
import os
import signal
import sys

from skillgen import cli
from skillgen.runtime.service import KafkaService


def main() -> int:
    kill_after, argv = int(sys.argv[1]), sys.argv[2:]
    finish = KafkaService.finish
    answered = [0]

    def finish_then_die(self: KafkaService, job) -> None:
        answered[0] += 1
        if answered[0] == kill_after:
            logging.getLogger("skillgen.test").warning("TEST HOOK: SIGKILL after terminal event %d, before its commit",
                                                       answered[0])
            os.kill(os.getpid(), signal.SIGKILL)
        finish(self, job)

    KafkaService.finish = finish_then_die
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
