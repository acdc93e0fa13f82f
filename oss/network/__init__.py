"""Network: one address per program and the redirectors that steer its ports.

`plan` decides what every node holds for a program (pure); `store` owns the
tables (address pool, members, listeners); `manager` ties them to an applier
(`net.redirector.Redirector`: pyroute2 and nft) and is what the OSS calls on
placement, listen/close reports, migration and the end of a program; `routes`
are the agents' and accounts' HTTP routes.
"""
