"""Correlation: many sources' observations of one kernel fact become one event."""

from .correlator import Correlator, CorrelatorSettings, CorrelatorStats

__all__ = ["Correlator", "CorrelatorSettings", "CorrelatorStats"]
