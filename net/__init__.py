"""DCP net package."""
