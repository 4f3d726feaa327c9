"""The one route a mistake takes to the user: raise UserError("what is wrong: what to do").

It is a SystemExit, so wherever it is raised (at import, in a command, deep in a run) the program ends with one
line on stderr, `error: <message>`, exit status 1, and no traceback. Asserts guard the code's own invariants only.
Imports nothing of the project: constants.py raises it too. The watchdog that stops a hung run lives here too.
"""
import contextlib
import math
import signal
import threading
import time


class UserError(SystemExit):
    """A problem the user must act on; `message` is the line without its `error: ` prefix."""

    def __init__(self, message):
        self.message = message
        super().__init__(f"error: {message}")


@contextlib.contextmanager
def sigterm_as_error(message):
    """Within the block, SIGTERM raises UserError(message) (on the main thread, where signals arrive)."""
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


class Watchdog:
    """SIGTERM to the main thread, said as a hang, when no step ended (`last`) for `seconds` before `over()`."""

    def __init__(self, seconds, over=lambda: False):
        self.over, self.seconds, self.last, self.said = over, seconds, time.monotonic(), None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="autoresearch-watchdog", daemon=True)

    def __enter__(self):
        if math.isfinite(self.seconds):
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()

    def _watch(self):
        while not self._done.wait(min(1.0, self.seconds / 4)):
            if self.over():
                return
            if time.monotonic() - self.last > self.seconds:
                self.said = (f"no training step ended in {self.seconds:g} s: train.py hangs (a sleep, a wait, a "
                             "deadlock?) and was stopped: a crash")
                signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
                return
