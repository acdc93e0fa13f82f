"""The one ordered sequence of OSS schema versions (`PRAGMA user_version` 1..N).

Each service keeps the DDL of its own tables in its `schema.py`; this list says
which fragments make each version, in order.  Append-only: a new migration is a
fragment in the owner's schema.py plus one line here.
"""

from __future__ import annotations

from oss.accounts import schema as accounts
from oss.billing import schema as billing
from oss.compute import schema as compute
from oss.db.migrations import Version, check_sequence
from oss.ipc import schema as ipc
from oss.network import schema as network
from oss.storage import schema as storage
from oss.telemetry import schema as telemetry

VERSIONS: tuple[Version, ...] = (
    (1, (accounts.V1, compute.V1, billing.V1, telemetry.V1, ipc.V1)),  # the initial schema
    (2, (accounts.V2,)),  # running spend totals (back-filled from billing records)
    (3, (compute.V3,)),  # instances_place index
    (4, (compute.V4, telemetry.V4)),  # newest-first lists, log reads in chunk order
    (5, (compute.V5,)),  # the agent's exec key
    (6, (accounts.V6,)),  # allow_root
    (7, (compute.V7,)),  # programs.view_json, programs.placement (issue 10, chunk B)
    (8, (telemetry.V7,)),  # measured usage: processes, report_seq, measured_net, storage
    (9, (compute.V_LIMITS,)),  # programs.stop_json/client_placed, idle_since, pool_backoff (E)
    (10, (telemetry.V10,)),  # processes.moved_to, freeze_ms (issue 12: migration)
    (11, (network.V_NET,)),  # program addresses, members, listeners (issue 13)
    (12, (compute.V_MOVES,)),  # instances.draining, placement_moves (issue 12)
    (13, (compute.V_SPEED, telemetry.V_MOVE_REASON)),  # speeds, move reasons (issue 12)
    (14, (storage.V_SPECS,)),  # storage specs and mounts survive a restart (issue 14)
    (15, (compute.V_FAILOVER,)),  # failover policies, checkpoint index survive (issue 12)
    (16, (network.V_UNIX,)),  # AF_UNIX paths, moved connections' pins survive (13)
)
check_sequence(VERSIONS)
