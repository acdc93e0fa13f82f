"""Telemetry of the programs an agent runs: usage, output lines and lifecycle events,
batched to the OSS (`uplink`), cut into lines (`lines`), sampled live (`sampler`)."""
