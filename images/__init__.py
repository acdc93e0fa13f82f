"""DCP images package."""
