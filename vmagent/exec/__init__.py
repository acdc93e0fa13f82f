"""Exec: both ends of the deputy link.  The wire protocol (`protocol`), exec tickets
(`tickets`); at home, the deputy that stands in for a remote program (`deputy`, its
connection `link`, what it tells the agent in HELLO `hello`) and the command line that
makes a process its deputy (`remote`); on the instance, the agent's exec connections
(`server`), the program and its streams (`session`), starting it (`spawn`) and the
reader probe (`readers`).
Keep this file free of imports: the deputy imports `vmagent.exec.protocol`, `.link`
and `.hello` on the path of every remote exec.
"""
