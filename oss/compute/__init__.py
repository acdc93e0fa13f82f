"""Compute: the instances programs run on and where a program's processes go.

It owns instance pools and their fill decisions (`pool.py`) and the providers that
boot instances (`providers/`: libvirt), the process scheduler that places a
program's processes on instances (`scheduler.py`), availability (`availability.py`:
silent instances fail), the optimizer that sets a program's target width
(`optimizer.py`), and the exec tickets minted for placed processes
(`exectickets.py`).  Its decision modules are pure; the pool manager and the
placement transaction call them.
"""
