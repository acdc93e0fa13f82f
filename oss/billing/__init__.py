"""Billing: per-second metering and the pricing models, resource limits and budgets
at account, user and program level.  Owns the limits and billing tables
(`schema.py`; the `Billing` repository and `BudgetCheck`, compute's `Budget`, in
`store.py`) and the limits and billing routes (`routes.py`).
"""
