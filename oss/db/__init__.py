"""The shared database layer: one SQLite file, one writer thread with group commit,
reader connections (`store.py`) and the migration runner (`migrations.py`).  It
knows no service: the schema versions come from oss.schema, the queries from each
service's repository.
"""
