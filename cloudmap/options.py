"""The options of a pool and of a map, checked once before anything starts or is sent.

:class:`PoolOptions` holds ``Pool(...)``'s arguments; ``Pool(...)`` and ``Pool.plan(...)``
both check them here, so both refuse the same input with the same message.
:class:`MapOptions` holds the keyword options of ``map``, ``imap``, ``run``, ``job.map`` and
``executor()``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, NamedTuple

from .autoscale import Autoscale
from .errors import InputError
from .providers import PoolSpec, Provider, get_provider
from .providers.base import StartTask
from .seeding import check_accepts_rng, check_seed
from .staging import as_inputs, as_outputs
from .validation import check_int, check_positive

#: Seconds ``Pool(...)`` waits for its first node before giving up (``start_timeout=``).
START_TIMEOUT = 120.0
ON_ERROR_CHOICES = ("raise", "return", "skip")


class CheckedPool(NamedTuple):
    """What a pool is, once its options are checked: the provider to use and the spec."""

    provider_class: type[Provider]
    spec: PoolSpec
    start_timeout: float
    tls: bool
    provider_options: dict[str, Any]


@dataclass(frozen=True)
class PoolOptions:
    """The arguments of ``Pool(...)`` (see :class:`cloudmap.Pool` for what each means).

    ``provider_options`` are the keywords a provider takes for itself (local: ``root=``...).
    """

    provider: str = "local"
    nodes: int | None = None
    spot_nodes: int = 0
    autoscale: Autoscale | None = None
    slots_per_node: int = 1
    start_task: StartTask = None
    start_task_timeout: float | None = None
    env: dict[str, str] | None = None
    resource_files: Sequence[str | tuple[str, str]] = ()
    packages: Sequence[str] = ()
    storage_options: dict[str, Any] | None = field(default=None, repr=False)
    start_timeout: float | None = None
    tls: bool | None = None
    provider_options: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_keywords(cls, provider: str, keywords: dict[str, Any]) -> PoolOptions:
        """``Pool``'s keywords as one dict (``Pool.plan``): names ``Pool`` does not know
        itself go to the provider, which refuses the ones it does not know either."""
        own = {f.name for f in fields(cls)} - {"provider", "provider_options"}
        mine = {k: v for k, v in keywords.items() if k in own}
        theirs = {k: v for k, v in keywords.items() if k not in own}
        return cls(provider, **mine, provider_options=theirs)

    def checked(self) -> CheckedPool:
        """Check every provider-independent option and make the pool's :class:`PoolSpec`."""
        provider_class = get_provider(self.provider)
        slots_per_node, autoscale = self.slots_per_node, self.autoscale
        check_int("slots_per_node", slots_per_node, minimum=1)
        if autoscale is not None and not isinstance(autoscale, Autoscale):
            raise InputError(f"autoscale={autoscale!r} is not valid: pass cloudmap.Autoscale(...)")
        nodes = self.nodes
        if nodes is None and provider_class.default_nodes is not None:
            nodes = 0 if autoscale else provider_class.default_nodes
        if nodes is None:
            nodes = 0 if autoscale else max(1, (os.cpu_count() or 1) // slots_per_node)
        check_int("nodes", nodes, minimum=0)
        check_int("spot_nodes", self.spot_nodes, minimum=0)
        if self.start_task_timeout is not None:
            check_positive("start_task_timeout", self.start_task_timeout)
        start_task = self.start_task
        if start_task is not None and not (isinstance(start_task, str) or callable(start_task)):
            raise InputError(
                f"start_task={start_task!r} is neither a shell command string nor a callable"
            )
        if self.spot_nodes:
            check_spot(provider_class, "pass spot_nodes=0")
        if autoscale and autoscale.spot:
            check_spot(provider_class, "pass Autoscale(spot=False)")
        start_timeout = self.start_timeout
        if start_timeout is None:
            start_timeout = provider_class.start_timeout or START_TIMEOUT
        check_positive("start_timeout", start_timeout)
        if self.tls is not None and not isinstance(self.tls, bool):
            raise InputError(f"tls={self.tls!r} is not valid: pass True, False or None")
        spec = PoolSpec(
            nodes,
            slots_per_node,
            start_task,
            self.start_task_timeout,
            {str(k): str(v) for k, v in (self.env or {}).items()},
            spot_nodes=self.spot_nodes,
            resource_files=_resource_files(self.resource_files),
            packages=_packages(self.packages),
            storage_options=_storage_options(self.storage_options),
        )
        tls = provider_class.tls_by_default if self.tls is None else self.tls
        return CheckedPool(provider_class, spec, start_timeout, tls, dict(self.provider_options))


def check_spot(provider_class: type[Provider], fix: str) -> None:
    """Refuse spot nodes on a provider that has none, saying how to do without."""
    if not provider_class.supports_spot:
        raise InputError(
            f"the {provider_class.name!r} provider has no spot nodes; {fix}, "
            "or use a provider with spot capacity"
        )


def resize_targets(
    current: tuple[int, int],
    nodes: int | None,
    spot_nodes: int | None,
    provider_class: type[Provider],
) -> tuple[int, int]:
    """The (dedicated, spot) targets ``pool.resize(nodes, spot_nodes)`` asks for; None keeps
    a target as it is."""
    dedicated, spot = current
    if nodes is not None:
        check_int("nodes", nodes, minimum=0)
        dedicated = nodes
    if spot_nodes is not None:
        check_int("spot_nodes", spot_nodes, minimum=0)
        if spot_nodes:
            check_spot(provider_class, "pass spot_nodes=0")
        spot = spot_nodes
    return dedicated, spot


def autoscale_policy(
    current: Autoscale | None,
    policy: Autoscale | bool | None,
    settings: dict[str, Any],
    provider_class: type[Provider],
) -> Autoscale | None:
    """The policy ``pool.autoscale(policy, **settings)`` asks for, given the ``current`` one:
    None (or False) for off, a new :class:`Autoscale`, or ``current`` (or the default
    policy) with some fields changed."""
    if policy is None or policy is False:
        if settings:
            raise InputError("pool.autoscale(None) turns autoscale off; it takes no settings")
        return None
    if policy is True:
        base = current or Autoscale()
    elif isinstance(policy, Autoscale):
        base = policy
    else:
        raise InputError(
            f"autoscale({policy!r}) is not valid: pass cloudmap.Autoscale(...), settings "
            "such as max_nodes=8, or None to turn it off"
        )
    try:
        new = dataclasses.replace(base, **settings)
    except TypeError as exc:
        names = ", ".join(f.name for f in dataclasses.fields(Autoscale))
        raise InputError(f"{exc}; the settings of autoscale are: {names}") from None
    if new.spot:
        check_spot(provider_class, "pass Autoscale(spot=False)")
    return new


def _resource_files(files: Sequence[str | tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for entry in [files] if isinstance(files, str) else files:
        pair = (entry, "") if isinstance(entry, str) else entry
        if not (
            isinstance(pair, (tuple, list))
            and len(pair) == 2
            and all(isinstance(part, str) for part in pair)
            and pair[0]
        ):
            raise InputError(
                f"resource_files entry {entry!r} is not valid: pass URLs, or (url, path) pairs"
            )
        url, path = pair
        path = path or url.rstrip("/").rsplit("/", 1)[-1]
        if path.startswith("/") or ".." in path.split("/"):
            raise InputError(f"resource file path {path!r} must stay inside the shared directory")
        pairs.append((url, path))
    return tuple(pairs)


def _packages(packages: Sequence[str]) -> tuple[str, ...]:
    listed = [packages] if isinstance(packages, str) else list(packages)
    for package in listed:
        if not isinstance(package, str) or not package.strip():
            raise InputError(f"packages entry {package!r} is not a pip requirement string")
    return tuple(listed)


def _storage_options(options: dict[str, Any] | None) -> dict[str, Any]:
    if options is not None and not isinstance(options, dict):
        raise InputError("storage_options must be a dict of fsspec options")
    return dict(options or {})


@dataclass(frozen=True)
class MapOptions:
    """How one map runs: the keyword options of ``map``, ``imap`` and ``executor()``."""

    seed: int | None = None
    batch_size: int | None = None
    retries: int = 0
    timeout: float | None = None
    on_error: str = "raise"
    progress: Any = None
    inputs: Any = None
    outputs: Any = None
    storage_options: dict[str, Any] | None = field(default=None, repr=False)  # credentials
    capture_output: bool = True
    cache: Any = None

    @classmethod
    def from_keywords(cls, options: dict[str, Any], where: str, **defaults: Any) -> MapOptions:
        """The options of ``map`` given as keywords elsewhere (``executor(...)``,
        ``job.map(...)``); an unknown name is an InputError that lists the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InputError(
                f"{where} does not take {', '.join(unknown)}; its options are those of "
                f"pool.map: {', '.join(sorted(known))}"
            )
        return cls(**{**defaults, **options})

    def checked(self, fn: Callable[..., Any]) -> MapOptions:
        """Validate every option before any work is sent; return them normalised."""
        seed = self.seed
        if seed is not None:
            seed = check_seed(seed)
            check_accepts_rng(fn)
        if self.batch_size is not None:
            check_int("batch_size", self.batch_size, minimum=1)
        check_int("retries", self.retries, minimum=0)
        if self.timeout is not None:
            check_positive("timeout", self.timeout)
        if self.on_error not in ON_ERROR_CHOICES:
            choices = ", ".join(map(repr, ON_ERROR_CHOICES))
            raise InputError(f"on_error={self.on_error!r} is not one of {choices}")
        if not isinstance(self.capture_output, bool):
            raise InputError(
                f"capture_output={self.capture_output!r} is not valid: pass True (show what "
                "tasks print under the cell) or False (leave it in the slots' logs)"
            )
        if self.storage_options is not None and not isinstance(self.storage_options, dict):
            raise InputError(
                f"storage_options={self.storage_options!r} is not valid: pass a dict of fsspec "
                "options (for example connection_string=...)"
            )
        return replace(
            self, seed=seed, inputs=as_inputs(self.inputs), outputs=as_outputs(self.outputs)
        )
