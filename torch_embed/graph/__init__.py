"""Trace arbitrary models into width groups."""
