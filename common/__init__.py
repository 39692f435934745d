"""Family-agnostic building blocks used by model families and by the host.

Nothing here imports a model family or the host: dependencies flow
common -> models/<family> -> host -> CLI / web UI.
"""
