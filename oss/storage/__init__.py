"""Storage: the program's files, one namespace on every instance.

Path mapping (`pathmap.py`: virtual -> real paths, resolved component by
component as the kernel would), the run's SFTP storage server with its lock
subsystem (`server.py`, `locks.py`), the tier policy (`policy.py`), a run's
volumes (`run.py`) and their relay to VM instances (`relay.py`).  The errors
live here so that catching them does not import the server (asyncssh).
"""


class StorageError(Exception):
    """The storage service failed."""


class StorageStartError(StorageError):
    """The storage server did not start."""
