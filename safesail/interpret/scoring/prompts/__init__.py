"""Prompts of the scorers: one module per scorer (simulation, detection, fuzzing)."""
