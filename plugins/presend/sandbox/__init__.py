"""Sandbox servers on loopback that speak the vendors' API shapes (CRM source, ESP)."""
