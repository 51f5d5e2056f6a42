"""Exceptions with messages that name the file, key or value at fault.

Every error a user can cause derives from :class:`DnnmodError`, so the command line prints
its message without a traceback and exits non-zero.
"""


class DnnmodError(Exception):
    """Base class for errors caused by input: names, configs, files."""


class UnknownNameError(DnnmodError, KeyError):
    """A dataset, model, approach or recipe name that is not registered."""

    def __init__(self, kind: str, name: str, known) -> None:
        self.kind, self.name, self.known = kind, name, sorted(known)
        super().__init__(f"unknown {kind} {name!r}; known: {', '.join(self.known)}")

    def __str__(self) -> str:  # KeyError would otherwise quote the whole message
        return self.args[0]


class ChecksumError(DnnmodError):
    """A downloaded or local file whose content does not match its published checksum."""


class DownloadError(DnnmodError):
    """A transfer that failed after all retries."""


class ArtifactError(DnnmodError):
    """A model, module or data file that is missing, truncated, or belongs elsewhere."""


class ConfigError(DnnmodError):
    """A configuration value that is invalid for the step that reads it."""


class TrainingDivergedError(DnnmodError):
    """Training whose loss became NaN or infinite: a recipe (usually its learning rate) that
    this model and dataset cannot train with."""
