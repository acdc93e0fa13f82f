"""IPC: coordination between a program's processes across instances.

It owns the internal locking service (`locking.py`: leases with fencing tokens,
never exposed to clients); cross-instance signals come here next.
"""
