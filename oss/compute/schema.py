"""The compute service's tables: DDL fragments of the one migration sequence (oss.schema)."""

# Instance types, pools, instances and their tokens, programs, placements, policies.
V1 = """
    CREATE TABLE instance_tokens(instance TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE,
        created REAL NOT NULL);
    CREATE TABLE policies(account_id TEXT PRIMARY KEY REFERENCES accounts(id), body TEXT NOT NULL);
    CREATE TABLE instance_types(name TEXT PRIMARY KEY, cpus INTEGER NOT NULL,
        memory_mb INTEGER NOT NULL, price_micros_per_s INTEGER NOT NULL, storage TEXT);
    CREATE TABLE pools(name TEXT PRIMARY KEY, instance_type TEXT NOT NULL
        REFERENCES instance_types(name), warm_target INTEGER NOT NULL, max_size INTEGER NOT NULL,
        provider TEXT NOT NULL, created REAL NOT NULL);
    CREATE TABLE instances(name TEXT PRIMARY KEY, pool TEXT, instance_type TEXT,
        state TEXT NOT NULL, address TEXT, hostname TEXT, cpus INTEGER NOT NULL DEFAULT 0,
        memory_mb INTEGER NOT NULL DEFAULT 0, price_micros_per_s INTEGER NOT NULL DEFAULT 0,
        storage TEXT, slots INTEGER NOT NULL DEFAULT 0, used_slots INTEGER NOT NULL DEFAULT 0,
        dedicated_to TEXT, last_heartbeat REAL, load TEXT, created REAL NOT NULL);
    CREATE INDEX instances_free ON instances(state, price_micros_per_s);
    CREATE TABLE programs(id TEXT PRIMARY KEY, account_id TEXT NOT NULL REFERENCES accounts(id),
        user_id TEXT NOT NULL REFERENCES users(id), state TEXT NOT NULL,
        status_reason TEXT NOT NULL, argv TEXT NOT NULL, env TEXT NOT NULL, cwd TEXT NOT NULL,
        image TEXT, processes INTEGER NOT NULL, lost_processes INTEGER NOT NULL DEFAULT 0,
        target_instances INTEGER NOT NULL, resource_policy TEXT NOT NULL,
        scaling_policy TEXT NOT NULL, storage_mb INTEGER NOT NULL, bandwidth_mbps INTEGER NOT NULL,
        exit_status INTEGER, signal INTEGER, spent_micros INTEGER NOT NULL DEFAULT 0,
        created REAL NOT NULL, updated REAL NOT NULL, last_metered REAL NOT NULL);
    CREATE INDEX programs_account ON programs(account_id, state);
    CREATE INDEX programs_user ON programs(user_id, state);
    CREATE INDEX programs_state ON programs(state);
    CREATE TABLE placements(program_id TEXT NOT NULL REFERENCES programs(id),
        instance TEXT NOT NULL REFERENCES instances(name), processes INTEGER NOT NULL,
        account_id TEXT NOT NULL, user_id TEXT NOT NULL, PRIMARY KEY(program_id, instance));
    CREATE INDEX placements_instance ON placements(instance);
    CREATE INDEX placements_account ON placements(account_id, instance);
    CREATE INDEX placements_user ON placements(user_id, instance);
"""

# Placement candidates are read in this order and cut at CANDIDATES: walk an index.
V3 = """
    CREATE INDEX instances_place ON instances(state, price_micros_per_s, used_slots, name);
"""

# Newest-first program lists without a sort.
V4 = """
    CREATE INDEX programs_recent ON programs(account_id, created);
"""

# The agent's exec key (exec tickets for clients); never returned by any API.
V5 = """
    ALTER TABLE instances ADD COLUMN exec_key TEXT;
"""

# Issue 10 (chunk B): the program's view (bound into its exec tickets) and its
# placement policy (spread | pack | local: oss.compute.scheduler.choose; NULL, as
# for programs submitted without a view: the width-and-locality rule of `place`).
V7 = """
    ALTER TABLE programs ADD COLUMN view_json TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE programs ADD COLUMN placement TEXT;
"""

# Issue 10 (chunk E: limits act, autoscaling): why a limit stopped a program (billing's
# breach), whether its processes are placed one exec at a time by its client (never
# re-placed by recovery), since when a ready instance runs nothing, a pool's back-off.
V_LIMITS = """
    ALTER TABLE programs ADD COLUMN stop_json TEXT;
    ALTER TABLE programs ADD COLUMN client_placed INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE instances ADD COLUMN idle_since REAL;
    CREATE TABLE pool_backoff(pool TEXT PRIMARY KEY, failures INTEGER NOT NULL,
        next_try REAL NOT NULL, error TEXT NOT NULL);
"""

# Issue 12 (migration): an instance being drained takes no new placements; a moved
# process's slot follows it (placement_moves forwards the home's later release,
# which names the instance it placed on, to where the process went).
V_MOVES = """
    ALTER TABLE instances ADD COLUMN draining INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE placement_moves(program_id TEXT NOT NULL, source TEXT NOT NULL,
        target TEXT NOT NULL, processes INTEGER NOT NULL,
        PRIMARY KEY(program_id, source, target));
"""

# Issue 12 (optimizer moves): an instance's CPU score as its agent measured it at
# registration, and the relative speed an instance type declares (used where no
# score was measured).
V_SPEED = """
    ALTER TABLE instances ADD COLUMN speed REAL;
    ALTER TABLE instance_types ADD COLUMN speed REAL;
"""

# Issue 12 (failover): what a restarted OSS needs to keep failing over — programs'
# checkpoint policies and the instances told them, the index of the stored checkpoints
# (the files are under `checkpoints/`; a row is only kept with its whole file), the
# restorations for the programs' homes, the lost instances still to be fenced, and the
# instances whose CRIU works.  Nothing secret: the session key is in the file only.
V_FAILOVER = """
    CREATE TABLE failover_policies(program_id TEXT PRIMARY KEY, every REAL NOT NULL);
    CREATE TABLE failover_ordered(program_id TEXT NOT NULL, instance TEXT NOT NULL,
        PRIMARY KEY(program_id, instance));
    CREATE TABLE failover_checkpoints(program_id TEXT NOT NULL, session TEXT NOT NULL,
        holder TEXT NOT NULL, instance TEXT NOT NULL, pid INTEGER NOT NULL,
        nonce TEXT NOT NULL, argv TEXT NOT NULL, taken REAL NOT NULL, size INTEGER NOT NULL,
        PRIMARY KEY(program_id, session));
    CREATE TABLE failover_restorations(id INTEGER PRIMARY KEY, program_id TEXT NOT NULL,
        restoration_json TEXT NOT NULL);
    CREATE INDEX failover_restorations_program ON failover_restorations(program_id);
    CREATE TABLE failover_fenced(instance TEXT NOT NULL, program_id TEXT NOT NULL,
        PRIMARY KEY(instance, program_id));
    CREATE TABLE checkpoint_instances(instance TEXT PRIMARY KEY);
"""
