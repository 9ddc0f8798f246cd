"""Experiment-tracked training for rainforest species audio detection (RFCX)."""

__version__ = "0.1.0"
