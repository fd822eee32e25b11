"""Moved: the agent's logger and error counter are ``poolwatch._log`` (private) since 0.1.0.

A thin re-export for code written against the old path; it goes in poolwatch 0.2.0.
"""

from ._log import AgentErrors, errors, logger

__all__ = ["AgentErrors", "errors", "logger"]
