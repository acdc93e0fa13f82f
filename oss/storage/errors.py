"""The storage service's base error, importable without the server's dependencies
(asyncssh): a run's start-up names it before any server runs."""


class StorageError(Exception):
    """The storage service failed."""
