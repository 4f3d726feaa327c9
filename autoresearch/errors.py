"""The one route a mistake takes to the user: raise UserError("what is wrong: what to do").

It is a SystemExit, so wherever it is raised (at import, in a command, deep in a run) the program ends with one
line on stderr, `error: <message>`, exit status 1, and no traceback. Asserts guard the code's own invariants only.
Imports nothing: constants.py raises it too.
"""


class UserError(SystemExit):
    """A problem the user must act on (missing data, a bad setting, a damaged cache, a knob that cannot work).
    `message` holds the line without its `error: ` prefix."""

    def __init__(self, message):
        self.message = message
        super().__init__(f"error: {message}")
