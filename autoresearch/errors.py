"""The one route a mistake takes to the user: raise UserError("what is wrong: what to do").

It is a SystemExit, so wherever it is raised (at import, in a command, deep in a run) the program ends with one
line on stderr, `error: <message>`, exit status 1, and no traceback. Asserts guard the code's own invariants only.
Imports nothing of the project: constants.py raises it too.
"""
import contextlib
import signal
import threading


class UserError(SystemExit):
    """A problem the user must act on (missing data, a bad setting, a damaged cache, a knob that cannot work).
    `message` holds the line without its `error: ` prefix."""

    def __init__(self, message):
        self.message = message
        super().__init__(f"error: {message}")


@contextlib.contextmanager
def sigterm_as_error(message):
    """Within the block, SIGTERM (`timeout` running out, a kill) raises UserError(message): the program stops as on
    any other error, its cleanup runs and one line is said. Only on the main thread, where signals arrive."""
    said = []

    def stopped(signum, frame):
        # From here on the process is stopping: a second SIGTERM (`timeout` signals `uv run` and its whole process
        # group, and uv passes it on: two) is ignored, so that it cannot cut the cleanup and the record short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        said.append(signum)
        raise UserError(message)

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stopped) if main else None
    try:
        yield
    finally:
        if main and not said:
            signal.signal(signal.SIGTERM, previous)
