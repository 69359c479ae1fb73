"""A hash of what a function computes, the same in every process: the key of cached results.

``cache=`` keeps a map's results under the function's hash, so the hash must not change when
the kernel restarts or a cell is run again, and must change when anything the function's
result depends on changes. Pickled bytes of a function will not do: cloudpickle puts the
cell's temporary file name and line numbers into a notebook function, and sets pickle in an
order that changes with ``PYTHONHASHSEED``. So the function is hashed by what it is made of:
its code (bytecode, constants, names, argument layout, never file names or line numbers),
its defaults, the values its closure holds, and the globals its code reads, recursively for
functions defined by value. Values are hashed canonically (dicts and sets sorted, arrays by
dtype, shape and bytes); modules, functions and classes of installed packages by name and the
package's version. What cannot be hashed reproducibly (a lock, an open file, a generator) is
refused with an :class:`~cloudmap.InputError` that names it and says what to do;
``strict=False`` puts a marker in its place instead, for records that must never fail.
"""

from __future__ import annotations

import copyreg
import dataclasses
import dis
import functools
import hashlib
import importlib
import importlib.metadata
import os
import struct
import sys
import types
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import InputError

#: Bump when the canonical form changes, so that old cached results miss instead of lying.
FORMAT = b"cloudmap-fingerprint-1"

#: co_flags bits that say what the code is (generator, varargs...); the higher bits are
#: ``from __future__`` compiler flags, whose effect is already in the bytecode.
_CODE_FLAGS = 0xFFFF
_PRIMITIVES = (type(None), bool, int, float, complex, str, bytes, bytearray)
#: Attributes of a class's ``__dict__`` that say nothing about what the class computes.
_CLASS_NOISE = frozenset(
    {"__dict__", "__weakref__", "__module__", "__doc__", "__qualname__", "_abc_impl"}
)


class _Refused(Exception):
    """A value on the way that has no reproducible hash (caught by :func:`function_hash`)."""

    def __init__(self, value: Any, reason: str) -> None:
        super().__init__(reason)
        self.value = value
        self.reason = reason


def function_hash(fn: Callable[..., Any], *, strict: bool = True) -> str:
    """Return a hex digest of what ``fn`` computes, stable across processes and restarts.

    Parameters
    ----------
    fn : callable
        A function (also a lambda or a function defined in a notebook), a
        ``functools.partial``, a bound method, a class or a callable object.
    strict : bool
        With True (the default), a captured value that cannot be hashed reproducibly raises
        :class:`~cloudmap.InputError`. With False, such a value is replaced by a marker of its
        type, so the call never fails: a best-effort hash for records, not for caching.

    Returns
    -------
    str
        64 hex characters.

    Raises
    ------
    InputError
        With ``strict=True``: the function captures (in a closure, a default, a global its
        code reads, a partial's arguments) a value with no reproducible hash. The message
        names the function, the captured name and its type, and how to pass it instead.

    Examples
    --------
    >>> def area(r):
    ...     return 3.14159 * r * r
    >>> function_hash(area) == function_hash(area)
    True
    """
    hasher = _Hasher(strict=strict)
    try:
        digest = hasher.value(fn)
    except _Refused as exc:
        raise InputError(_refusal(fn, hasher.refused_at, exc)) from None
    except RecursionError:
        if not strict:
            return hashlib.sha256(FORMAT + b"too-deep:" + _name(fn).encode()).hexdigest()
        raise InputError(
            f"cache= cannot hash the function {_name(fn)}: what it captures is nested too "
            "deeply; pass large or deep data as items or build it inside the function"
        ) from None
    return hashlib.sha256(FORMAT + _python() + digest).hexdigest()


def value_hash(value: Any) -> str:
    """Return a hex digest of a plain value (an item), or raise ``TypeError`` if it has none.

    Used for the keys of cached items; the caller falls back on the item's pickle.
    """
    return value_digest(value).hex()


def value_digest(value: Any) -> bytes:
    """:func:`value_hash` as 32 bytes (the cache computes one per item: no hex round trip)."""
    if type(value) in _PRIMITIVES:
        return _primitive(value)
    try:
        return _Hasher(strict=True).value(value)
    except (_Refused, RecursionError) as exc:
        raise TypeError(f"no reproducible hash for {type(value).__name__}: {exc}") from None


def _python() -> bytes:
    """Bytecode differs between Python versions: results are keyed by the minor version."""
    return f"py{sys.version_info[0]}.{sys.version_info[1]}".encode()


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__qualname__


def _refusal(fn: Any, where: list[str], exc: _Refused) -> str:
    path = " -> ".join(where) or "the function itself"
    kind = type(exc.value)
    type_name = f"{kind.__module__}.{kind.__qualname__}".removeprefix("builtins.")
    return (
        f"cache= needs a reproducible hash of the function {_name(fn)}, but it captures "
        f"{path}, a {type_name} ({exc.reason}). Pass that value as an item, or through "
        "functools.partial(fn, value) as plain data (numbers, strings, tuples, dicts, numpy "
        "arrays, dataclasses), create it inside the function, or define the function at "
        "the top level of a module. If it is a loop variable captured by a lambda or an "
        "inner function: such a variable is late-bound, so every function made in the loop "
        "sees its last value; bind each value with functools.partial(f, value) or a default "
        "argument (lambda x, v=v: ...). Or drop cache=."
    )


@functools.lru_cache(maxsize=1)
def _distributions() -> dict[str, list[str]]:
    return dict(importlib.metadata.packages_distributions())


@functools.lru_cache(maxsize=512)
def _installed_version(top: str) -> str | None:
    """``top``'s distribution and version if it is a package installed in a site-packages
    folder (or the stdlib); None for a module of your own, a package installed with
    ``pip install -e`` (its code changes without its version) or one not imported.

    Decided by where the module's file is, not by what ``importlib.metadata`` finds first:
    that depends on the current directory (a checkout's ``*.egg-info`` is found there).
    """
    if top in sys.stdlib_module_names or top in ("builtins", "__future__"):
        return "stdlib-" + _python().decode()
    module = sys.modules.get(top)
    path = getattr(module, "__file__", None)
    if not path or not _in_site_packages(path):
        return None
    for name in _distributions().get(top, []):
        for dist in importlib.metadata.distributions(name=name):
            if _in_site_packages(str(dist.locate_file(""))):
                return f"{name}=={dist.version}"
    return None


def _in_site_packages(path: str) -> bool:
    parts = os.path.realpath(path).split(os.sep)
    return "site-packages" in parts or "dist-packages" in parts


@functools.lru_cache(maxsize=512)
def _file_digest(path: str, mtime_ns: int) -> bytes:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).digest()


def _module_token(module: types.ModuleType) -> bytes:
    """A module by name and its package's version; a module of no installed package (a
    file next to the notebook) by its source, so that editing it misses."""
    name = module.__name__
    version = _installed_version(name.partition(".")[0])
    if version is not None:
        return _tag(b"module", name.encode(), version.encode())
    path = getattr(module, "__file__", None)
    if path and os.path.isfile(path):
        return _tag(b"module-file", name.encode(), _file_digest(path, os.stat(path).st_mtime_ns))
    return _tag(b"module", name.encode(), str(getattr(module, "__version__", "")).encode())


def _tag(kind: bytes, *parts: bytes) -> bytes:
    """The digest of a kind and its parts, each length-prefixed so that none can run into
    the next."""
    h = hashlib.sha256(kind)
    for part in parts:
        h.update(struct.pack("<Q", len(part)))
        h.update(part)
    return h.digest()


def _importable(obj: Any) -> bytes | None:
    """A reference to ``obj`` when an installed package's module gives it back by name."""
    module_name = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if not isinstance(module_name, str) or not isinstance(qualname, str) or "<" in qualname:
        return None
    version = _installed_version(module_name.partition(".")[0])
    if version is None:
        return None
    module = sys.modules.get(module_name)
    if module is None:
        try:
            module = importlib.import_module(module_name)
        except Exception:
            return None
    found: Any = module
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if found is not obj:
        return None
    return _tag(b"ref", module_name.encode(), qualname.encode(), version.encode())


class _Hasher:
    """One hashing pass: a guard against cycles, digests of functions already seen, and the
    path to the value being hashed (for the error message)."""

    def __init__(self, *, strict: bool) -> None:
        self.strict = strict
        self.stack: dict[int, int] = {}  # id -> depth, of containers and functions in progress
        self.done: dict[int, tuple[Any, bytes]] = {}  # id -> (object kept alive, digest)
        self.where: list[str] = []
        self.refused_at: list[str] = []

    # -- dispatch ---------------------------------------------------------------------------

    def value(self, value: Any) -> bytes:
        kind = type(value)
        if kind in _PRIMITIVES:
            return _primitive(value)
        key = id(value)
        if key in self.done:
            return self.done[key][1]
        if key in self.stack:  # a cycle: name the depth it goes back to, deterministically
            return _tag(b"cycle", str(len(self.stack) - self.stack[key]).encode())
        self.stack[key] = len(self.stack)
        try:
            try:
                digest = self._compound(value)
            except (_Refused, RecursionError):
                raise
            except Exception as exc:  # an object whose parts misbehave when inspected
                raise _Refused(value, f"inspecting it raised {type(exc).__name__}: {exc}") from None
        except _Refused:
            if self.strict:
                if not self.refused_at:
                    self.refused_at = list(self.where)
                raise
            digest = _tag(b"unhashable", f"{kind.__module__}.{kind.__qualname__}".encode())
        finally:
            del self.stack[key]
        if isinstance(value, (types.FunctionType, type, types.CodeType)):
            self.done[key] = (value, digest)
        return digest

    def _at(self, label: str, value: Any) -> bytes:
        self.where.append(label)
        try:
            return self.value(value)
        finally:
            self.where.pop()

    def _compound(self, value: Any) -> bytes:
        kind = type(value)
        if kind is tuple or kind is list:
            return _tag(kind.__name__.encode(), *(self.value(v) for v in value))
        if kind is dict or kind is types.MappingProxyType:
            return self._mapping(b"dict", value.items())
        if kind is set or kind is frozenset:
            return _tag(kind.__name__.encode(), *sorted(self.value(v) for v in value))
        if isinstance(value, np.ndarray):
            return self._array(value)
        if isinstance(value, np.generic):
            return _tag(b"np-scalar", value.dtype.str.encode(), value.tobytes())
        if isinstance(value, types.ModuleType):
            return _module_token(value)
        if isinstance(value, types.CodeType):
            return self._code(value)
        if isinstance(value, types.FunctionType):
            return self._function(value)
        if isinstance(value, functools.partial):
            return _tag(
                b"partial",
                self._at("the partial's function", value.func),
                self._at("the partial's arguments", value.args),
                self._at("the partial's keywords", dict(value.keywords)),
            )
        if isinstance(value, types.MethodType):
            return _tag(
                b"method",
                self.value(value.__func__),
                self._at(f"the object of the method {_name(value)}", value.__self__),
            )
        if isinstance(value, type):
            return self._class(value)
        if isinstance(value, (types.BuiltinFunctionType, types.MethodWrapperType)):
            self_ = getattr(value, "__self__", None)
            if self_ is None or isinstance(self_, types.ModuleType):
                ref = _importable(value)
                if ref is not None:
                    return ref
                module = getattr(value, "__module__", None) or ""
                return _tag(b"builtin", str(module).encode(), _name(value).encode())
            return _tag(b"bound-builtin", _name(value).encode(), self.value(self_))
        if isinstance(value, (staticmethod, classmethod)):
            return _tag(kind.__name__.encode(), self.value(value.__func__))
        if isinstance(value, (types.MemberDescriptorType, types.GetSetDescriptorType)):
            return _tag(b"descriptor", value.__name__.encode())
        if isinstance(value, property):
            return _tag(b"property", self.value(value.fget), self.value(value.fset))
        if value is Ellipsis or value is NotImplemented:
            return _tag(b"singleton", repr(value).encode())
        if dataclasses.is_dataclass(value):
            fields = [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
            return _tag(
                b"dataclass",
                self.value(kind),
                *(self._at(f"field {name!r}", v) for name, v in fields),
            )
        return self._reduced(value)

    # -- kinds ------------------------------------------------------------------------------

    def _mapping(self, tag: bytes, items: Any) -> bytes:
        pairs = sorted(_tag(b"item", self.value(k), self.value(v)) for k, v in items)
        return _tag(tag, *pairs)

    def _array(self, array: np.ndarray) -> bytes:
        if array.dtype.hasobject:
            return _tag(b"object-array", str(array.shape).encode(), self.value(array.tolist()))
        return _tag(
            b"ndarray",
            array.dtype.str.encode(),
            str(array.shape).encode(),
            np.ascontiguousarray(array).tobytes(),
        )

    def _code(self, code: types.CodeType) -> bytes:
        """Bytecode, constants (nested code objects too), names and argument layout; never
        the file name, the line numbers or the function's own name."""
        return _tag(
            b"code",
            code.co_code,
            getattr(code, "co_exceptiontable", b""),
            str(
                (
                    code.co_argcount,
                    code.co_posonlyargcount,
                    code.co_kwonlyargcount,
                    code.co_flags & _CODE_FLAGS,
                    code.co_names,
                    code.co_varnames,
                    code.co_freevars,
                    code.co_cellvars,
                )
            ).encode(),
            *(self.value(const) for const in code.co_consts),
        )

    def _function(self, fn: types.FunctionType) -> bytes:
        """A function of an installed package by reference; any other one by value."""
        ref = _importable(fn)
        if ref is not None:
            return ref
        name = fn.__qualname__
        parts = [self._code(fn.__code__)]
        parts.append(self._at(f"the defaults of {name}", fn.__defaults__))
        parts.append(self._at(f"the keyword defaults of {name}", fn.__kwdefaults__))
        for var, cell in zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=True):
            try:
                content = cell.cell_contents
            except ValueError:  # a cell not filled yet (a name assigned after the def)
                parts.append(_tag(b"empty-cell", var.encode()))
                continue
            parts.append(
                _tag(b"cell", var.encode(), self._at(f"closure variable {var!r}", content))
            )
        glob = fn.__globals__
        for global_name in sorted(_global_names(fn.__code__)):
            if global_name not in glob:
                continue  # a builtin or an attribute name: the name is in the bytecode
            label = f"global {global_name!r} (read by {name})"
            parts.append(_tag(b"global", global_name.encode(), self._at(label, glob[global_name])))
        return _tag(b"function", *parts)

    def _class(self, cls: type) -> bytes:
        """A class of an installed package by reference; one defined here by its bases and
        the contents of its body (methods by value)."""
        ref = _importable(cls)
        if ref is not None:
            return ref
        body = {k: v for k, v in vars(cls).items() if k not in _CLASS_NOISE}
        return _tag(
            b"class",
            cls.__qualname__.encode(),
            *(self.value(base) for base in cls.__bases__),
            _tag(
                b"body",
                *(
                    _tag(k.encode(), self._at(f"{cls.__qualname__}.{k}", v))
                    for k, v in sorted(body.items())
                ),
            ),
        )

    def _reduced(self, value: Any) -> bytes:
        """Any other object by the parts pickle would rebuild it from, hashed canonically
        (so a set inside it does not make the hash depend on ``PYTHONHASHSEED``)."""
        kind = type(value)
        if isinstance(value, types.GeneratorType | types.CoroutineType):
            raise _Refused(value, "it is consumed as it runs")
        ref = _importable(value)  # a module-level object such as numpy.sqrt
        if ref is not None:
            return ref
        try:
            reducer = copyreg.dispatch_table.get(kind)
            reduced = reducer(value) if reducer is not None else value.__reduce_ex__(4)
        except Exception as exc:
            raise _Refused(value, f"it cannot be pickled: {exc}") from None
        if isinstance(reduced, str):  # a module-level singleton, pickled by name
            module = getattr(value, "__module__", None) or kind.__module__
            return _tag(b"global-ref", str(module).encode(), reduced.encode())
        if not isinstance(reduced, tuple) or len(reduced) < 2:
            raise _Refused(value, "its pickled form is not a (callable, arguments) pair")
        rebuild, args, *rest = reduced
        parts = [self.value(rebuild), self.value(args)]
        state = rest[0] if rest else None
        parts.append(self.value(state))
        if len(rest) > 1 and rest[1] is not None:
            parts.append(self.value(list(rest[1])))
        if len(rest) > 2 and rest[2] is not None:
            parts.append(self._mapping(b"dictitems", list(rest[2])))
        return _tag(b"reduced", self.value(kind), *parts)


_GLOBAL_OPS = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "STORE_GLOBAL", "DELETE_GLOBAL"})


def _global_names(code: types.CodeType) -> set[str]:
    """The names a code object (and the code nested in it) reads as globals: only those,
    not attribute names (``rng.random`` must not drag in a global named ``random``)."""
    names = {
        str(instruction.argval)
        for instruction in dis.get_instructions(code)
        if instruction.opname in _GLOBAL_OPS
    }
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _primitive(value: Any) -> bytes:
    kind = type(value)
    if kind is float:
        return _tag(b"float", value.hex().encode())
    if kind is complex:
        return _tag(b"complex", value.real.hex().encode(), value.imag.hex().encode())
    if kind is str:
        return _tag(b"str", value.encode("utf-8", "surrogatepass"))
    if kind is bytes or kind is bytearray:
        return _tag(kind.__name__.encode(), bytes(value))
    return _tag(kind.__name__.encode(), repr(value).encode())
