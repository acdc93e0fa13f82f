"""The home side of the cluster: local instances (agents in network namespaces),
the placement policies, and the coordinators that place exec'd programs on
instances (local ones, or those a running dcp-oss grants).
"""
