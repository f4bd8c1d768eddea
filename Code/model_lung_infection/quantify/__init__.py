"""Quantification: a classical HU lung mask and the per-case report (mL, percentages, pictures)."""
