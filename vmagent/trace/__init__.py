"""What the instance does about the programs it runs: tracing them, and limits (enforce)."""
