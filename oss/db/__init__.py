"""The shared database layer: one SQLite file, one writer thread with group commit,
reader connections, and the one ordered sequence of schema migrations.
"""
