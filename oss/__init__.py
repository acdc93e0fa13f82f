"""DCP oss package."""
