"""Evaluators: task files, metrics and fast batched scoring of live models or model dirs."""
