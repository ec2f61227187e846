"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class DelucevaError(Exception):
    """A problem with the user's input (file, URL, model, option) that the user can fix."""


class SourceError(DelucevaError):
    """A video source cannot be opened or decoded."""


class ModelError(DelucevaError):
    """A model cannot be found, loaded or converted."""


class OutputError(DelucevaError):
    """An output path cannot be written."""
