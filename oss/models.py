"""API request/response models (pydantic v2, unknown fields rejected).

These are the wire types; /openapi.json is generated from them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from oss.billing.pricing import PricingModel
from oss.compute.optimizer import Goal
from oss.compute.scheduler import Tenancy

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]
Id = Annotated[str, StringConstraints(min_length=1, max_length=64)]
NonNeg = Annotated[int, Field(ge=0, le=2**62)]
Text = Annotated[str, StringConstraints(max_length=65536)]


class Api(BaseModel):
    """Base of every wire model: unknown fields are an error."""

    model_config = ConfigDict(extra="forbid")


class ErrorBody(Api):
    """Every 4xx/5xx body."""

    error: str
    message: str
    fields: dict[str, object] = {}


class Ok(Api):
    """A plain acknowledgement."""

    ok: bool = True


# -- accounts, users, tokens -------------------------------------------------


class AccountCreate(Api):
    """Create a client account with a first user and token (admin only)."""

    name: Name
    admin: bool = False
    pricing_model: PricingModel = PricingModel.SUM
    user: Name = "admin"


class Account(Api):
    """A client account."""

    id: str
    name: str
    admin: bool
    pricing_model: PricingModel
    created: float


class UserCreate(Api):
    """Create a user under the caller's account."""

    name: Name


class User(Api):
    """A user of an account."""

    id: str
    account_id: str
    name: str
    created: float


class AccountCreated(Api):
    """A new account, its first user and that user's token (shown once)."""

    account: Account
    user: User
    token: str


class TokenCreate(Api):
    """Mint a token for a user of the caller's account (default: the caller)."""

    user_id: Id | None = None
    label: Annotated[str, StringConstraints(max_length=200)] = ""


class TokenInfo(Api):
    """A token's metadata (the secret is never stored)."""

    id: str
    user_id: str
    label: str
    created: float
    revoked: bool


class TokenCreated(TokenInfo):
    """A new token; `token` is shown only here."""

    token: str


# -- limits and policies -----------------------------------------------------


class LimitsBody(Api):
    """Resource limits; null or absent means unlimited."""

    max_instances: NonNeg | None = None
    max_storage_mb: NonNeg | None = None
    max_bandwidth_mbps: NonNeg | None = None
    budget_micros: NonNeg | None = None
    hard_budget_micros: NonNeg | None = None


class ResourcePolicy(Api):
    """How instances are selected for a program."""

    instance_type: Name | None = None
    min_price_micros: NonNeg | None = None
    max_price_micros: NonNeg | None = None
    storage: Name | None = None
    tenancy: Tenancy = Tenancy.SHARED


class ScalingPolicy(Api):
    """How the optimizer scales a program."""

    goal: Goal = Goal.FASTEST
    min_instances: Annotated[int, Field(ge=1, le=10_000)] = 1
    max_instances: Annotated[int, Field(ge=1, le=10_000)] = 1
    # Issue 12: may the optimizer move its CPU-bound processes to faster instances?
    # None: as the account's default policy says (on if it says nothing).
    moves: bool | None = None

    @model_validator(mode="after")
    def _bounds(self) -> ScalingPolicy:
        if self.min_instances > self.max_instances:
            raise ValueError("min_instances must be <= max_instances")
        return self


class Policies(Api):
    """An account's default policies."""

    resource_policy: ResourcePolicy = ResourcePolicy()
    scaling_policy: ScalingPolicy = ScalingPolicy()


# -- programs ----------------------------------------------------------------


# -- issue 10, chunk B: views and placement from an instance ---------------------

ViewPath = Annotated[str, StringConstraints(pattern=r"^/[^\x00]*$", max_length=4096)]


class ViewSpec(Api):
    """What the program's processes see wherever they run (`--map`), bound into tickets."""

    maps: Annotated[list[tuple[ViewPath, ViewPath]], Field(max_length=256)] = []
    placement: Literal["auto", "spread", "pack", "local"] = "spread"
    metering: Literal["exec", "full"] = "exec"
    home: Annotated[str, StringConstraints(max_length=255)] = ""


class ProgramSubmit(Api):
    """Submit a program execution."""

    argv: Annotated[
        list[Annotated[str, StringConstraints(max_length=4096)]],
        Field(min_length=1, max_length=4096),
    ]
    env: dict[
        Annotated[str, StringConstraints(max_length=4096)],
        Annotated[str, StringConstraints(max_length=65536)],
    ] = {}
    cwd: Annotated[str, StringConstraints(min_length=1, max_length=4096)] = "/"
    image: Annotated[str, StringConstraints(max_length=1024)] | None = None
    processes: Annotated[int, Field(ge=1, le=1024)] = 1
    resource_policy: ResourcePolicy | None = None
    scaling_policy: ScalingPolicy | None = None
    limits: LimitsBody | None = None
    storage_mb: NonNeg = 0
    bandwidth_mbps: NonNeg = 0
    view: ViewSpec | None = None  # issue 10: bound into every exec ticket of the program
    # Issue 12 (failover): checkpoint the placed processes every N seconds; an instance
    # lost restores them from their last checkpoint on another one.
    checkpoint_every: Annotated[float, Field(gt=0, le=86400)] | None = None


class Placement(Api):
    """Some of a program's processes on one instance."""

    instance: str
    processes: int


ProgramState = Literal[
    "pending",
    "running",
    "recovering",
    "finished",
    "failed",
    "cancelled",
    "stopped_budget",
    "stopped_limit",
    "suspended",  # at its hard budget, checkpointed; `resume` continues it (issue 12)
]


class StopInfo(Api):
    """Why a limit stopped a program (issue 10): the level, the resource, the limit, the value.

    `resource`: hard_budget_micros | instances | storage_mb | bandwidth_mbps; `value` is
    what was spent or measured when metering stopped it.
    """

    level: Literal["account", "user", "program"]
    resource: str
    limit: int
    value: int


class Program(Api):
    """A program execution."""

    id: str
    account_id: str
    user_id: str
    state: ProgramState
    status_reason: str
    argv: list[str]
    env: dict[str, str]
    cwd: str
    image: str | None
    processes: int
    lost_processes: int
    target_instances: int
    resource_policy: ResourcePolicy
    scaling_policy: ScalingPolicy
    storage_mb: int
    bandwidth_mbps: int
    exit_status: int | None
    signal: int | None
    spent_micros: int
    created: float
    updated: float
    placements: list[Placement]
    view: ViewSpec = ViewSpec()
    stop: StopInfo | None = None  # set when a limit stopped it (stopped_budget/stopped_limit)
    address: str | None = None  # the program's address on its instances (issue 13)


class ExecIdentity(Api):
    """The exec the placed processes run and the ids they run as (bound into tickets)."""

    uid: Annotated[int, Field(ge=0, le=2**32 - 2)]
    gid: Annotated[int, Field(ge=0, le=2**32 - 2)]
    groups: Annotated[list[Annotated[int, Field(ge=0, le=2**32 - 2)]], Field(max_length=256)] = []
    digest: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]  # sha256, path + argv


class PlacementRequest(Api):
    """Place more processes of a running program (an exec/fork landing)."""

    processes: Annotated[int, Field(ge=1, le=1024)] = 1
    # Exec tickets are minted only for a placement that says what it runs and as whom.
    exec_as: ExecIdentity | None = None
    # A spread hint: among otherwise equal new instances, these come last (e.g. the
    # instance the previous process went to, so sequential processes alternate).
    avoid: Annotated[list[Name], Field(max_length=64)] = []


class AgentPlacementRequest(Api):
    """An instance asks to place one exec of a program it runs (recursive placement)."""

    processes: Annotated[int, Field(ge=1, le=1)] = 1
    parent_pid: Annotated[int, Field(ge=1, le=2**31)]
    exec_as: ExecIdentity
    avoid: Annotated[list[Name], Field(max_length=64)] = []


class ExecGrant(Api):
    """What a client needs to start the placed processes on one instance itself."""

    instance: str
    address: str  # HOST:PORT of the instance's agent
    tickets: list[str]  # one single-use exec ticket per placed process


class PlacementResult(Api):
    """Where the new processes go."""

    program_id: str
    assignments: list[Placement]
    # For instances whose agent registered an exec key (others: none).
    exec_grants: list[ExecGrant] = []


class ReleaseRequest(Api):
    """Some processes of a program on an instance ended."""

    instance: Id
    processes: Annotated[int, Field(ge=1, le=1024)] = 1


class ProgramFinish(Api):
    """The program ended."""

    exit_status: Annotated[int, Field(ge=0, le=255)] | None = None
    signal: Annotated[int, Field(ge=1, le=64)] | None = None


# -- logs and metrics --------------------------------------------------------


class LogLineIn(Api):
    """One line to append (ts defaults to the server's clock)."""

    ts: Annotated[float, Field(ge=0, le=1e11)] | None = None
    stream: Literal["stdout", "stderr", "log"] = "log"
    text: Text
    instance: Id | None = None
    pid: Annotated[int, Field(ge=0, le=2**31)] | None = None


class LogAppend(Api):
    """Lines to append to a program's log."""

    lines: Annotated[list[LogLineIn], Field(min_length=1, max_length=10_000)]


class AgentLogAppend(LogAppend):
    """Lines an agent appends to a program's log."""

    program_id: Id


class LogLineOut(Api):
    """One line of a log."""

    ts: float
    stream: str
    text: str
    instance: str | None
    pid: int | None


class LogPage(Api):
    """Lines of a log, in order; `cursor` names the next line (pass it back to go on)."""

    lines: list[LogLineOut]
    cursor: int


# The OSS services a syscall is counted under (tracer.syscalls.Service): the only keys a
# metrics report may use, so the series per program are a fixed, small set.
ServiceName = Literal["compute", "memory", "storage", "network", "ipc", "local"]


class MetricsReport(Api):
    """Counter increments for one program (on one instance it is placed on, if given)."""

    instance: Id | None = None
    syscalls: dict[ServiceName, NonNeg] = {}
    latency_seconds: dict[ServiceName, Annotated[float, Field(ge=0, le=1e9)]] = {}
    cpu_seconds: Annotated[float, Field(ge=0, le=1e9)] = 0.0
    memory_bytes: NonNeg | None = None
    io_read_bytes: NonNeg = 0
    io_write_bytes: NonNeg = 0
    net_rx_bytes: NonNeg = 0
    net_tx_bytes: NonNeg = 0


class Counters(Api):
    """Accumulated counters for a program or an instance."""

    syscalls: dict[str, int]
    latency_seconds: dict[str, float]
    cpu_seconds: float
    memory_bytes: int
    io_read_bytes: int
    io_write_bytes: int
    net_rx_bytes: int
    net_tx_bytes: int


class MetricsJson(Api):
    """Counters per program and per instance visible to the caller."""

    programs: dict[str, Counters]
    instances: dict[str, dict[str, float]]


# -- telemetry: what agents measure (issue 10, chunk C; logs typed here, filled by D) --

Pid = Annotated[int, Field(ge=1, le=2**31)]
Stamp = Annotated[float, Field(ge=0, le=1e11)]
ArgvItem = Annotated[str, StringConstraints(max_length=4096)]
EventKind = Literal[
    "placed", "spawn", "exec", "exit", "signal", "lost", "frozen", "killed",
    "suspended", "resumed",  # a budget stop checkpointed it; a resume restored it (issue 12)
]  # fmt: skip


class UsageRow(Api):
    """One process's usage on the reporting instance: totals so far, never increments.

    The OSS keeps the highest figure seen per process, so a row sent twice (a
    retried batch, a sample and then the final row) is counted once.
    """

    program_id: Id
    pid: Pid
    started: Stamp  # with pid, names the process (pids are reused)
    parent_instance: Name | None = None  # the instance of the process that placed it
    parent_pid: Pid | None = None
    session: Pid | None = None  # the pid of the program its agent session runs
    argv: Annotated[list[ArgvItem], Field(max_length=256)] = []
    final: bool = False  # the process ended: these are its last figures
    exit_status: Annotated[int, Field(ge=0, le=255)] | None = None
    signal: Annotated[int, Field(ge=1, le=64)] | None = None
    cpu_us: NonNeg = 0
    maxrss_kb: NonNeg = 0
    rchar: NonNeg = 0  # bytes read by any means (/proc/PID/io)
    wchar: NonNeg = 0
    rbytes: NonNeg = 0  # bytes read from storage
    wbytes: NonNeg = 0
    net_rx: NonNeg = 0  # TCP payload bytes received (sock_diag)
    net_tx: NonNeg = 0
    syscalls: dict[ServiceName, NonNeg] = {}
    # Issue 12 (optimizer moves): microseconds it waited runnable (run queue, throttling)
    # and when a live sample read these totals (the OSS profiles CPU-bound processes).
    wait_us: NonNeg = 0
    at: Stamp | None = None


class AgentLogLine(Api):
    """One line a placed process wrote on stdout or stderr."""

    program_id: Id
    pid: Pid
    ts: Stamp
    stream: Literal["stdout", "stderr"]
    text: Text


class EventRow(Api):
    """A lifecycle event of a placed process (logged as stream `event`)."""

    program_id: Id
    pid: Pid
    ts: Stamp
    kind: EventKind
    ppid: Pid | None = None
    argv: Annotated[list[ArgvItem], Field(max_length=256)] = []
    status: Annotated[int, Field(ge=0, le=255)] | None = None
    signal: Annotated[int, Field(ge=1, le=64)] | None = None
    text: Annotated[str, StringConstraints(max_length=4096)] = ""


class StorageRow(Api):
    """The storage a program's view holds, as its instance walked it (kB of st_blocks)."""

    program_id: Id
    kb: NonNeg


class AgentReport(Api):
    """One batch of an agent's telemetry; `seq` increases per batch (a retry keeps it)."""

    instance: Name
    seq: Annotated[int, Field(ge=1, le=2**62)]
    usage: Annotated[list[UsageRow], Field(max_length=4096)] = []
    logs: Annotated[list[AgentLogLine], Field(max_length=10_000)] = []
    events: Annotated[list[EventRow], Field(max_length=4096)] = []
    storage: Annotated[list[StorageRow], Field(max_length=4096)] = []


class ReportAck(Api):
    """The highest batch the OSS holds for the instance; `refused` rows named programs the
    instance never ran (dropped, counted)."""

    acked_seq: int
    refused: int = 0


class ProcessRow(Api):
    """One process of a program as the OSS recorded it."""

    pid: int
    instance: str
    started: float
    parent: str | None  # "INSTANCE:PID" of the process that placed it
    session: int | None  # the pid of its session's program (whose output it shares)
    argv: list[str]
    state: Literal["running", "exited", "lost", "migrated"]
    ended: float | None  # for `migrated`: when it left (moved_to, freeze_ms below)
    exit_status: int | None
    signal: int | None
    cpu_seconds: float
    max_rss_kb: int
    io_read_bytes: int
    io_write_bytes: int
    storage_read_bytes: int
    storage_write_bytes: int
    net_rx_bytes: int
    net_tx_bytes: int
    syscalls_by_service: dict[str, int]
    # `migrated` (issue 12): the instance it moved to and how long it was frozen
    moved_to: str | None = None
    freeze_ms: float | None = None
    move_reason: str | None = None  # why it moved: the optimizer's reason, or who asked


class ProcessQuery(Api):
    """`?final_wait=S&expect=N`: wait up to S seconds until at least N processes are
    recorded and every one has ended."""

    final_wait: Annotated[float, Field(ge=0, le=10)] = 0.0
    expect: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    # issue 16: one page of the list (rows in start order); `total` counts them all
    offset: Annotated[int, Field(ge=0, le=10_000_000)] = 0
    limit: Annotated[int, Field(ge=1, le=100_000)] | None = None


class ProcessList(Api):
    """A program's processes; `incomplete` lists those without final figures yet."""

    processes: list[ProcessRow]
    incomplete: list[str]  # "INSTANCE:PID"
    address: str | None = None  # the program's address (issue 13), where it has one
    total: int | None = None  # rows in all (set when a page was asked for)


class ProgramMetrics(Counters):
    """A program's counters with the breakdown by instance and by process."""

    by_instance: dict[str, Counters] = {}
    by_process: dict[str, Counters] = {}  # "INSTANCE:PID" (the newest MAX_PROCESS_ROWS)


# -- instances and pools -----------------------------------------------------


class InstanceTypeBody(Api):
    """An instance type."""

    name: Name
    cpus: Annotated[int, Field(ge=1, le=4096)]
    memory_mb: Annotated[int, Field(ge=1, le=2**40)]
    price_micros_per_s: NonNeg
    storage: Name | None = None
    # Relative CPU speed (issue 12: used where an instance's agent measured none).
    speed: Annotated[float, Field(gt=0, le=1e6)] | None = None


class PoolCreate(Api):
    """Create (or resize) a pool (admin only)."""

    name: Name
    instance_type: Name
    warm_target: Annotated[int, Field(ge=0, le=100_000)] = 0
    max_size: Annotated[int, Field(ge=0, le=100_000)] = 1000
    provider: Name = "local"


class Pool(Api):
    """A pool of instances of one type."""

    name: str
    instance_type: InstanceTypeBody
    warm_target: int
    max_size: int
    provider: str
    live: int
    idle: int


class InstanceCreate(Api):
    """Register an instance by name (admin only); returns its bearer token once."""

    name: Name
    pool: Name | None = None


class InstanceToken(Api):
    """An instance's bearer token (shown once)."""

    instance: str
    token: str


class Instance(Api):
    """A compute instance."""

    name: str
    pool: str | None
    instance_type: str | None
    state: Literal["pending", "ready", "failed", "destroyed"]
    address: str | None
    hostname: str | None
    cpus: int
    memory_mb: int
    price_micros_per_s: int
    storage: str | None
    slots: int
    used_slots: int
    dedicated: bool
    last_heartbeat: float | None
    # issue 16: the load it last reported (None: none since the OSS started) and when
    # its last heartbeat arrived (held in memory; `last_heartbeat` is persisted each tick)
    load: Load | None = None
    seen: float | None = None
    # issue 12: its CPU speed as its agent measured it (vmagent.cpuscore; 1.0 = reference)
    speed: float | None = None


# -- billing -----------------------------------------------------------------


class BillingRecord(Api):
    """One metering interval of one program."""

    id: int
    program_id: str
    user_id: str
    start: float
    end: float
    seconds: int
    model: PricingModel
    amount_micros: int
    instance_micros: float
    storage_micros: float
    net_micros: float
    premium_micros: float
    # A `--oss` run's measured storage (issue 14): GiB-seconds per tier it was billed for
    storage_gib_seconds: dict[str, float] = {}


class Billing(Api):
    """Billing records and their total."""

    total_micros: int
    records: list[BillingRecord]


# -- agents (wire contract in CONTRACTS.md) ----------------------------------


class AgentRegister(Api):
    """An agent announces itself."""

    instance: Name
    address: Annotated[str, StringConstraints(max_length=300)]
    hostname: Annotated[str, StringConstraints(max_length=300)]
    cpus: Annotated[int, Field(ge=1, le=4096)]
    memory_mb: Annotated[int, Field(ge=1, le=2**40)]
    # The agent's per-process key for exec tickets the OSS mints for clients
    # (kept with the instance, never returned by any API, never logged).
    exec_key: (
        Annotated[str, StringConstraints(min_length=32, max_length=256, pattern=r"^[0-9a-f]+$")]
        | None
    ) = Field(default=None, repr=False, json_schema_extra={"writeOnly": True})
    # Its CRIU works (issue 12): a hard budget suspends (checkpoints) programs there.
    checkpoint: bool = False
    # Its measured CPU score (issue 12, optimizer moves; vmagent.cpuscore: 1.0 = reference).
    speed: Annotated[float, Field(gt=0, le=1e6)] | None = None


class AgentRegistered(Api):
    """How often the agent must heartbeat."""

    instance: str
    heartbeat_interval: float


class Load(Api):
    """An instance's load."""

    cpu_percent: Annotated[float, Field(ge=0, le=1e6)]
    memory_used_mb: NonNeg
    runqueue: Annotated[float, Field(ge=0, le=1e9)]
    processes: NonNeg


class AgentHeartbeat(Api):
    """An agent is alive."""

    instance: Name
    seq: NonNeg
    load: Load
    # Ids of the commands (HeartbeatReply.commands) it has carried out since its last beat.
    done: Annotated[list[Annotated[int, Field(ge=1, le=2**62)]], Field(max_length=1024)] = []


# -- limits act (issue 10, chunk E) ---------------------------------------------


class AgentCommand(Api):
    """An order for one instance's agent, carried by the heartbeat reply.

    `action`: freeze the program's processes there, kill them, or thaw them.
    `tickets`: nonces of the exec tickets the OSS minted for the program on this
    instance (the agent finds the sessions they started).
    """

    id: int
    program: str
    action: Literal[
        "freeze", "kill", "thaw", "migrate", "signal", "resume", "mount", "unmount", "network",
        "checkpoint", "restore",
    ]
    reason: str
    tickets: list[str] = []
    # kill with checkpoint (issue 12): suspend (CRIU dump, then kill) the sessions the
    # agent can checkpoint; `resume` restores them later.
    checkpoint: bool | None = None
    # migrate (issue 12): the session whose program is `pid` goes to instance `to` at
    # `address`; the agent asks for its ticket (POST /v1/agents/migrations/ticket).
    # signal (issue 11): send `signal` to the program's `pid` if it runs there.
    pid: int | None = None
    to: str | None = None
    address: str | None = None
    # network (issue 13): what this instance must hold for the program
    # (`net.nodestate.to_wire`; an empty state: drop it).
    state: dict[str, Any] | None = None
    signal: int | None = None
    thread: bool | None = None  # signal: `pid` names a thread, which alone gets it
    sender: int | None = None  # signal: the sender's program pid (the receiver's si_pid)
    # mount / unmount (issue 14): the program's storage (its server, key and tiers)
    storage: dict[str, Any] | None = None
    # checkpoint (issue 12, failover): checkpoint the program's sessions every N s;
    # restore: the session (hex id) to restore from its last checkpoint.
    every: float | None = None
    session: str | None = None


class SignalRequest(Api):
    """A process of the program (on the asking instance, or at its home) signals one of
    the program's pids forked on an instance (issue 11: `oss.ipc.signals`)."""

    pid: Annotated[int, Field(ge=1, le=2**31 - 1)]
    signal: Annotated[int, Field(ge=0, le=64)]
    # tgkill/tkill: `pid` is a thread's id; that thread alone gets it (else the process).
    thread: bool = False
    # The sending process's program pid (0: not said): the receiver's si_pid.
    sender: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0


class SignalQueued(Api):
    """The instances the signal was sent to (each delivers it if it holds that pid)."""

    instances: list[str]


class HeartbeatReply(Api):
    """The answer to a heartbeat: commands for this instance only (kept until done)."""

    ok: bool = True
    commands: list[AgentCommand] = []


# -- leases (locking service; instance tokens only) ---------------------------


LeaseName = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class LeaseAcquire(Api):
    """Acquire or renew a lease for the calling instance."""

    name: LeaseName
    ttl: Annotated[float, Field(gt=0, le=3600)] = 10.0


class LeaseRef(Api):
    """A lease by name and fencing token (release, validate)."""

    name: LeaseName
    fencing: Annotated[int, Field(ge=1, le=2**62)]


class LeaseOut(Api):
    """A granted lease."""

    name: str
    holder: str
    fencing: int
    expires: float


# -- migration (issue 12) ----------------------------------------------------------


class MigrateRequest(Api):
    """Move a program's running process tree(s) to another instance.

    `pid`: a process of the tree to move (its whole session moves); none: every
    session of the program not already on `to`.
    """

    to: Name
    pid: Annotated[int, Field(ge=1, le=2**31)] | None = None


class Migration(Api):
    """One session moved: its program's pid (the same on both instances)."""

    pid: int
    source: str
    target: str
    freeze_ms: float
    image_bytes: int = 0


class MigrateResult(Api):
    """What a migrate request moved."""

    program: str
    moved: list[Migration]


class DrainResult(Api):
    """What draining an instance did: the sessions moved off, those refused (a line
    each), and the instance's state after (`released`, `drained`, or unchanged)."""

    instance: str
    moved: list[Migration]
    refused: list[str]
    state: str


class MigrationTicketRequest(Api):
    """A source agent asks for the ticket of a migrate command it was given."""

    command: Annotated[int, Field(ge=1, le=2**62)]
    session: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{2,128}$")]


class MigrationTicket(Api):
    """A migration ticket for the command's target (60 s, single use)."""

    ticket: str


class MigrationOutcome(Api):
    """A source agent's word on a migrate command: done (with its figures) or refused."""

    command: Annotated[int, Field(ge=1, le=2**62)]
    ok: bool
    error: Annotated[str, StringConstraints(max_length=4096)] = ""
    pid: Annotated[int, Field(ge=0, le=2**31)] = 0
    freeze_ms: Annotated[float, Field(ge=0, le=1e9)] = 0.0
    image_bytes: Annotated[int, Field(ge=0, le=2**62)] = 0


# -- operating a cluster (issue 16) ---------------------------------------------------


class BillingQuery(Api):
    """`?since=T&user_id=U`: only records ending at or after T, only user U's programs."""

    since: Annotated[float, Field(ge=0, le=1e11)] | None = None
    user_id: Id | None = None


class Spend(Api):
    """What one account, user or program spent against its budgets (micros)."""

    level: Literal["account", "user", "program"]
    id: str
    name: str
    spent_micros: int
    budget_micros: int | None
    hard_budget_micros: int | None


class SpendReport(Api):
    """Spend against budget at the three levels (the newest `limit` programs)."""

    account: Spend
    users: list[Spend]
    programs: list[Spend]


class RestoreOutcome(Api):
    """A replacement instance's word on a `restore` command (issue 12, failover)."""

    command: int
    ok: bool
    error: Annotated[str, StringConstraints(max_length=4096)] = ""
    pid: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    salt: Annotated[str, StringConstraints(max_length=64, pattern=r"^[0-9a-f]*$")] = ""
    restore_ms: Annotated[float, Field(ge=0)] = 0.0


class Restoration(Api):
    """A process of the program restored from its checkpoint on another instance: its
    deputy resumes there (`address`, proving the key derived with `salt`)."""

    nonce: str
    pid: int
    lost: str  # the instance that was lost
    instance: str
    address: str
    salt: str
    taken: float  # when the checkpoint it came from was taken (epoch s)
    # Why it was given up ("" unless it was: then `instance` is "" and its deputy ends).
    error: str = ""
