"""The instance's side of the program network (issue 13).

`reporter`: the agent's session hook that hands the instance tracer's
listener records (`vmagent.trace.listeners`) to the OSS and answers them.
The instance's own set-up (the program address on its uplink, its port
block, rules, NAT) is a `NodeState` put in place by `net.redirector`: by the
OSS through the instance's network namespace on local instances.
"""
