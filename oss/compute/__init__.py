"""Compute: instance pools and their providers, the process scheduler (placement of
a program's processes on instances), availability (silent instances fail) and the
optimizer (a program's target width), with exec tickets for placed processes.
"""
