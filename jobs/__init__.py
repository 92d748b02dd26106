"""Thin entry points, one per stage and one for the whole pipeline."""
