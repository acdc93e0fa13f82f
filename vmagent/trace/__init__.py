"""The instance tracer: every program an agent starts runs under it.

`zygote` (forked by `dcp-agent` before its event loop) forks one tracer per
exec session; `host` is that tracer's main; `channel` the records they
exchange with the agent; `measure` what a process consumed at its exit;
`placing` where an exec'd program runs (the seam placement fills); `enforce`
what limits do to them (freeze, kill, thaw: the OSS's stop orders).
"""
