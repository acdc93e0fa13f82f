"""Exec: both ends of the deputy link that runs a traced process's program elsewhere.

Home end: `remote.py` (the command line that turns a traced execve into the deputy,
and the 0600 ticket files) and `deputy.py` (the deputy itself, running in the
original process: it mirrors descriptors, signals and the exit status), with its
connection `link.py` and what it tells the agent in HELLO `hello.py`.  Instance
end: the agent's exec connections and handshake `server.py`, one placed program
and its streams `session.py`, `spawn.py` (the HELLO request as a value, and
fork+exec with the deputy's process context) and `readers.py` (is the remote
program reading a pipe?).  Shared: `protocol.py` (the frames) and `tickets.py`
(single-use exec tickets and the mutual proof).  Keep this file free of imports:
the deputy imports `vmagent.exec.protocol`, `.link` and `.hello` on the path of
every remote exec.
"""
