"""The home side of the cluster: where a traced program's exec'd children run.

It owns `coordinator.py` (`ClusterCoordinator`: wraps the embedded coordinator and
rewrites a placed execve into the home deputy, with a ticket for the chosen
instance), `placement.py` (the pure spread/pack/local policies), `local.py`
(`LocalCluster`: N agents on this machine, each in its own namespaces on a lab
bridge, for `--instances N`) and `ossmode.py` (`--oss URL`: the same coordinator
with placements and exec tickets granted by a running dcp-oss, through
`oss.client`).  `tracer.compose` builds these, lazily, for a run that asks.
"""
