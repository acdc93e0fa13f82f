"""Checkpoint and restore of an exec session's process tree with CRIU (issue 12).

`criu.py` finds and checks CRIU and builds its command lines; `local.py`
checkpoints a session on its own instance (detach from the instance tracer,
dump, restore, adopt).  docs/CHECKPOINT.md says what moves and what cannot yet.
"""
