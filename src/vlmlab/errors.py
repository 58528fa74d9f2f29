"""The exceptions vlmlab raises for bad input. Each message is one line naming the file, record or field."""


class VlmlabError(Exception):
    """Base class: the CLI prints these as one line and exits with status 2 (no traceback)."""


class ConfigError(VlmlabError, ValueError):
    """A bad configuration value (names the field)."""


class DataError(VlmlabError, ValueError):
    """A dataset file or record is malformed (names the file and the record)."""


class ImageError(DataError):
    """An image is missing, unreadable, truncated, of a disallowed format, or too large (names the source)."""


class SampleError(DataError):
    """One training sample cannot be used (placeholder/image count mismatch, truncation through an image, ...).

    Raised by the processor; the trainer quarantines the sample instead of crashing."""


class CheckpointError(VlmlabError):
    """A checkpoint directory is missing, incomplete or corrupt (names the directory and file)."""
