"""Billing: what programs cost and how much they may use.

It owns per-second metering and the two pricing models (`pricing.py`) and the
resource limits and budgets at account, user and program level (`limits.py`),
both pure decisions that the placement and metering transactions apply.
"""
