"""Network plumbing over netlink (pyroute2): bridges, veth pairs and namespaces.

It owns `bridge.py` (the VM lab's bridge with its gateway address, named network
namespaces, interface-name checks, sockets opened inside a namespace: used by the
libvirt provider and `dcp-oss lab`) and `netns.py` (the lab network of local
instances: one bridge, one network namespace per instance, torn down by name).
Layer 0: it imports nothing of DCP; callers on an event loop run its blocking calls
off the loop under a timeout.
"""
