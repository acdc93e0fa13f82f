"""Exec: both ends of the deputy link.  The wire protocol, the home deputy that stands
in for a remote program, the command line that makes a process its deputy, exec
tickets, and the instance side that starts the program (spawn, reader probe).
Keep this file free of imports: the deputy imports `vmagent.exec.protocol` on the
path of every remote exec.
"""
