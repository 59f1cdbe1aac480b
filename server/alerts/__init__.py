"""Alerts: a table of rules (rules.py), judged by the leader (evaluator.py) from events and periodic checks of
the cluster's state; firing and resolved alerts are rows (published as watch kind `alerts`, recorded as events)
and are POSTed to webhooks (webhooks.py), unless a silence covers them (server/services/alerts.py)."""
