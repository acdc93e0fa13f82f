"""Exec: both ends of the deputy link that runs a traced process's program elsewhere.

Home end: `remote.py` (the command line that turns a traced execve into the deputy,
and the 0600 ticket files) and `deputy.py` (the deputy itself, running in the
original process: it mirrors descriptors, signals and the exit status).  Instance
end: `spawn.py` (the HELLO request as a value, and fork+exec with the deputy's
process context) and `readers.py` (is the remote program reading a pipe?), used by
the agent's exec service.  Shared: `protocol.py` (the frames) and `tickets.py`
(single-use exec tickets and the mutual proof).  Keep this file free of imports:
the deputy imports `vmagent.exec.protocol` on the path of every remote exec.
"""
