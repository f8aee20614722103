"""IronCore: a readable LLM training framework."""

__version__ = "0.1.0"
