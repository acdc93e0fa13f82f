"""The instance side of the program's storage (issue 14): its file system and mounts."""
