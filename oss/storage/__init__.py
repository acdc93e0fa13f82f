"""Storage: what a program's paths mean on the cluster.

It owns path mapping (`pathmap.py`: virtual -> real paths, resolved component by
component as the kernel would, used by the embedded OSS for every path-taking
call); storage tiers come here next.
"""
