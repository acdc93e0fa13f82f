"""Billing: per-second metering and the pricing models, resource limits and budgets
at account, user and program level.
"""
