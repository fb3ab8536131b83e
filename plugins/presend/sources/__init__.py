"""Extraction: page bodies from the source APIs into the landing zone, never parsed per record."""
