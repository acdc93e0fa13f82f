"""DCP tracer package."""
