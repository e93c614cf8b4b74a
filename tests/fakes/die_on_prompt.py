"""`python -m tests.fakes.die_on_prompt WORD <skillgen command...>`: run a real skillgen service that SIGKILLs
itself whenever its handler is given a record containing WORD, the way a decoder bomb or a driver crash takes a
process down. Production code has no hook for this; the test wraps the shared service skeleton's handler here."""

from __future__ import annotations

import logging
import os
import signal
import sys

from skillgen import cli
from skillgen.runtime.service import KafkaService


def main() -> int:
    word, argv = sys.argv[1].encode(), sys.argv[2:]
    init = KafkaService.__init__

    def init_with_a_deadly_handler(self: KafkaService, *args, handle, **kwargs) -> None:
        async def deadly(job) -> None:
            if word in job.record.value:
                logging.getLogger("skillgen.test").warning("TEST HOOK: SIGKILL on record %d (attempt %d)",
                                                           job.record.offset, job.attempt)
                os.kill(os.getpid(), signal.SIGKILL)
            await handle(job)

        init(self, *args, handle=deadly, **kwargs)

    KafkaService.__init__ = init_with_a_deadly_handler
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
