"""The Azure provider's settings: keyword argument, then Dask's configuration, then the
packaged defaults (``azure.yaml``), as Dask's own cluster managers resolve theirs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.config
import yaml

from ...errors import InputError

DEFAULTS_FILE = Path(__file__).with_name("azure.yaml")
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
        for name in ("resize_timeout", "request_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise InputError(f"{name}={value!r} is not valid: pass seconds > 0")
