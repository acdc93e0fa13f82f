"""The compute-instance layer: the agent on every instance, the home deputy, placement.

Keep this file empty of imports: the deputy imports `vmagent.exec.protocol` while it
starts inside a traced program's process, and every import costs latency there.
"""
