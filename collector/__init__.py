"""Agent usage collector: OTLP spans in, one exact row per agent session out."""

__version__ = "0.1.0"
