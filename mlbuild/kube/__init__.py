"""The kubernetes target: settings, rendered objects, rollout verdicts, the API client.

Nothing here is imported unless a kubernetes target is in play.
"""
