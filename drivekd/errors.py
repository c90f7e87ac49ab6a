"""Error hierarchy. Every message says what is wrong and how to fix it."""


class DriveKDError(Exception):
    """Base class: the CLI prints these as one clear line and exits non-zero (no traceback)."""


class DataError(DriveKDError):
    """Bad input data: names the file, the record index or sample id, and the field."""


class ModelError(DriveKDError):
    """A checkpoint that cannot be loaded or is of an unsupported family."""


class AlignmentError(DriveKDError):
    """Teacher and student token sequences (or store and data) do not line up."""


class StoreError(DriveKDError):
    """A teacher store that is missing, incomplete, or built with other settings."""


class ConfigError(DriveKDError):
    """A bad option; names the flag or config key to change."""
