"""Replica sync: a source's stream applied to a logical replica, exactly once."""
