"""Compute: instance pools and their providers, the process scheduler (placement of
a program's processes on instances), availability (silent instances fail) and the
optimizer (a program's target width), with exec tickets for placed processes.  Owns
the instance_types, pools, instances, instance_tokens, programs, placements and
policies tables (`schema.py`; repositories `instances.py`, `programs.py`, which
checks limits through the `Budget` protocol billing implements), the pool manager
(`pools.py`) and the program, instance, pool and agent routes (`routes.py`).
"""
