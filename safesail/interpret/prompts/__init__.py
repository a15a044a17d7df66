"""Prompt texts of the interpret stages (explain, simulate, tag), one file each."""
