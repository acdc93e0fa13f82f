"""The web view (issue 16): programs with their live timelines, instances, spend, logs."""
