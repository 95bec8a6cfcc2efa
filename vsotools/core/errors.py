"""The exceptions the library raises for bad input; the CLI turns them into one-line errors."""


class VsoError(Exception):
    """Base of every error caused by input or environment rather than by a bug.

    The message is complete on its own (it names the file, line or key at fault), so the CLI
    prints it as is and exits non-zero, without a traceback.
    """


class ConfigError(VsoError):
    """A recipe or a command-line override is invalid."""


class ManifestError(VsoError):
    """An ANP manifest or an ANP release file cannot be read."""


class ExistingOutput(VsoError):
    """An output location already holds something that this call must not overwrite.

    ``remedies`` say what the caller can do instead, in the library's terms: ``"resume"`` (carry
    on with what is there), ``"replace"`` (delete it and write anew) or ``"elsewhere"`` (write to
    another location). The command line turns each into the flag that does it.
    """

    def __init__(self, message: str, *remedies: str) -> None:
        super().__init__(message)
        self.remedies = remedies
