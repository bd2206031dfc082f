"""Joins to other tools' APIs (each module imports its tool; none is imported by `sera` itself)."""
