"""DCP vmagent package."""
