"""Storage: what a program's paths mean on the cluster (path mapping today; storage
tiers next).
"""
