"""The Azure provider's settings: keyword argument, then Dask's configuration, then the
packaged defaults (``azure.yaml``), as Dask's own cluster managers resolve theirs."""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.config
import yaml

from ...errors import InputError

DEFAULTS_FILE = Path(__file__).with_name("azure.yaml")
#: The scheduler's port on its node when ``scheduler_port`` is 0 (Dask's own default).
DEFAULT_BACKEND_PORT = 8786
#: Public ports of the scheduler's NAT endpoint: Batch gives each node of the pool one.
FRONTEND_RANGE = 1000
#: Batch takes 25 security rules per pool; one is the final "deny the rest".
MAX_ALLOW_RULES = 24
CONFIG_PREFIX = "cloudmap.azure"


def _load_defaults() -> dict[str, Any]:
    with DEFAULTS_FILE.open() as stream:
        defaults: dict[str, Any] = yaml.safe_load(stream)
    dask.config.update_defaults(defaults)
    return dict(defaults["cloudmap"]["azure"])


#: The packaged defaults, also the last resort if Dask's configuration was reset.
DEFAULTS = _load_defaults()


@dataclass(frozen=True)
class AzureSettings:
    """Where and how the pool's VMs run. See docs/azure.md for each field."""

    account_url: str | None
    vm_size: str
    image: dict[str, str]
    node_agent_sku_id: str
    pool_id: str | None = None
    keep_pool: bool = False
    python: str = "python3"
    install: str = "cloudmap[azure]"
    staging_url: str | None = None
    scheduler_host: str | None = None
    scheduler_port: int = 0
    resize_timeout: float = 900
    subnet_id: str | None = None
    mpi: bool = False
    request_timeout: float = 60
    scheduler: str | None = None  # "client" | "node"; None: node unless subnet_id is set
    allow_from: tuple[str, ...] | None = None  # CIDRs that may reach a node's scheduler
    allow_anywhere: bool = False  # let allow_from hold 0.0.0.0/0
    frontend_port: int = 40000  # first public port of the scheduler's NAT endpoint
    reconnect_timeout: float = 300  # seconds a client may be cut off from it
    list_interval: float = 0.25  # seconds between node listings (one paged listing each)
    retries: int = 6  # retries of one request that Batch throttled (429) or was busy (503)
    backoff: float = 0.5  # seconds before the first retry; doubles each time, jittered
    backoff_max: float = 30  # the longest wait between retries (a Retry-After may be longer)

    @property
    def scheduler_on_node(self) -> bool:
        """Whether the scheduler runs on a pool node (decision 0008): asked for, or by
        default when the client is not on the pool's network (no ``subnet_id``)."""
        if self.scheduler is None:
            return not self.subnet_id
        return self.scheduler == "node"

    @property
    def backend_port(self) -> int:
        """The port the scheduler listens on, on its node."""
        return int(self.scheduler_port) or DEFAULT_BACKEND_PORT

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def resolve_one(cls, name: str, given: Any = None) -> Any:
        """One setting: ``given`` when not None, else ``cloudmap.azure.<name>``."""
        if given is not None:
            return given
        configured = dask.config.get(f"{CONFIG_PREFIX}.{name}", None)
        return configured if configured is not None else DEFAULTS.get(name)

    @classmethod
    def resolve(cls, **given: Any) -> AzureSettings:
        """Each setting from ``given`` when not None, else ``cloudmap.azure.<name>``."""
        values = {name: cls.resolve_one(name, given.pop(name, None)) for name in cls.names()}
        if given:
            raise InputError(
                f"the 'azure' provider does not take {', '.join(sorted(given))}; its settings "
                f"are: {', '.join(cls.names())}, credential, prices"
            )
        if values["allow_from"] is not None:
            given = values["allow_from"]
            values["allow_from"] = (given,) if isinstance(given, str) else tuple(given)
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        if not isinstance(self.vm_size, str) or not self.vm_size:
            raise InputError(f"vm_size={self.vm_size!r} is not valid: pass e.g. Standard_D4s_v5")
        if not isinstance(self.image, dict) or not {"publisher", "offer", "sku"} <= set(self.image):
            raise InputError(
                f"image={self.image!r} is not valid: pass a dict with publisher, offer, sku "
                "(and version), as Batch's imageReference"
            )
        if self.account_url is not None and not str(self.account_url).startswith(
            ("https://", "http://")
        ):
            raise InputError(
                f"account_url={self.account_url!r} is not valid: pass the Batch account's URL, "
                "https://<account>.<region>.batch.azure.com"
            )
        self._check_scheduler()
        for name in (
            "resize_timeout",
            "request_timeout",
            "reconnect_timeout",
            "list_interval",
            "backoff",
            "backoff_max",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise InputError(f"{name}={value!r} is not valid: pass seconds > 0")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise InputError(
                f"retries={self.retries!r} is not valid: pass how many times to retry a "
                "request Batch throttled or was too busy for (0 or more)"
            )

    def _check_scheduler(self) -> None:
        if self.scheduler not in (None, "client", "node"):
            raise InputError(
                f"scheduler={self.scheduler!r} is not valid: pass 'node' (the scheduler runs "
                "on a pool node and the client connects to it: works from anywhere) or "
                "'client' (it runs in this process; the client must be on the pool's "
                "network, subnet_id=)"
            )
        port = self.frontend_port
        if (
            not isinstance(port, int)
            or not 1 <= port <= 65534 - FRONTEND_RANGE
            or (port + FRONTEND_RANGE > 50000 and port <= 55000)
        ):
            raise InputError(
                f"frontend_port={port!r} is not valid: pass a port from 1 to 49000 or from "
                f"55001 to {65534 - FRONTEND_RANGE}; Batch keeps 50000-55000, and the "
                f"endpoint takes {FRONTEND_RANGE} ports from it, one per node"
            )
        if not self.scheduler_on_node:
            return
        if not self.allow_from:
            raise InputError(
                "the pool's scheduler runs on a pool node (scheduler='node', the default "
                "without subnet_id) and is reached through a public address: pass "
                "allow_from=['<your public IP address>/32'], the addresses that may connect "
                "to it. Find yours with `curl https://api.ipify.org` (behind a company or "
                "university network, ask for its outgoing range)."
            )
        for source in self.allow_from:
            try:
                network = ipaddress.ip_network(source, strict=False)
            except ValueError:
                raise InputError(
                    f"allow_from entry {source!r} is not valid: pass CIDR ranges such as "
                    "'203.0.113.7/32' or '198.51.100.0/24'"
                ) from None
            if network.prefixlen == 0 and not self.allow_anywhere:
                raise InputError(
                    f"allow_from={list(self.allow_from)!r} opens the pool's scheduler to the "
                    "whole internet; pass your own address range instead, or "
                    "allow_anywhere=True if that is what you want (the pool's TLS "
                    "certificate still guards it)"
                )
        if len(self.allow_from) > MAX_ALLOW_RULES:
            raise InputError(
                f"allow_from has {len(self.allow_from)} entries; Batch takes at most "
                f"{MAX_ALLOW_RULES} (merge them into wider ranges)"
            )
