"""The HTTP face of the emulator: routing, Shared Key authentication, paging, JSON bodies.

Requests are checked the way the Batch service checks what ``azure-batch`` sends
(``azure.batch._patch.BatchSharedKeyAuthPolicy``): the same string-to-sign is rebuilt from the
request as received and its HMAC-SHA256 under the account key must equal the signature in
``Authorization: SharedKey <account>:<signature>``. Every answer carries ``request-id``,
``DataServiceVersion`` and the caller's ``client-request-id``; errors carry Batch's JSON
error body, which ``azure.batch`` turns into ``HttpResponseError.error.code``.

State changes are delegated to ``state.Account``, which answers at once: nothing here waits
on a node or a process.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import mimetypes
import re
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from .state import Account, BatchError, rfc1123, rfc3339
from .traffic import Traffic, operation

API_VERSION = "2025-06-01"
#: Batch's default and largest page of a list (``maxresults``) for pools, nodes and files.
MAX_PAGE = 1000
JSON_TYPE = "application/json;odata=minimalmetadata"

#: The standard headers, in order, whose values go into the string to sign.
SIGNED_HEADERS = (
    "content-encoding",
    "content-language",
    "content-length",
    "content-md5",
    "content-type",
    "date",
    "if-modified-since",
    "if-match",
    "if-none-match",
    "if-unmodified-since",
    "range",
)


def string_to_sign(
    method: str, headers: dict[str, str], account: str, raw_path: str, raw_query: str
) -> str:
    """Rebuild what the SDK signs, from the request as it arrived.

    Headers with empty values count as absent; a request other than GET/HEAD without
    Content-Length is signed as if it were ``0``; every header whose name contains ``ocp-``
    is added as ``name:value`` sorted by name; then ``/<account><path>`` with the path still
    percent-encoded; then one ``\\nname:value`` per query parameter, sorted by name as sent
    (not lower-cased), first value only, decoded, parameters with empty values left out.
    """
    present = {k.lower(): v for k, v in headers.items() if v}
    if method not in ("GET", "HEAD"):
        present.setdefault("content-length", "0")
    text = method + "\n" + "\n".join(present.get(h, "") for h in SIGNED_HEADERS) + "\n"
    for name, value in sorted((k, v) for k, v in present.items() if "ocp-" in k):
        text += f"{name}:{value}\n"
    text += f"/{account}{raw_path}"
    query = parse_qs(raw_query)
    for name in sorted(query):
        if query[name][0]:
            text += f"\n{name}:{query[name][0]}"
    return text


def sign(key: str, text: str) -> str:
    digest = hmac.new(base64.b64decode(key), text.encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def _auth_failed(detail: str) -> BatchError:
    return BatchError(
        403,
        "AuthenticationFailed",
        "Server failed to authenticate the request. Make sure the value of the Authorization "
        "header is formed correctly including the signature.",
        {"AuthenticationErrorDetail": detail},
    )


def _bad_query(name: str, value: str, reason: str) -> BatchError:
    return BatchError(
        400,
        "InvalidQueryParameterValue",
        "Value for one of the query parameters specified in the request URI is invalid.",
        {"QueryParameterName": name, "QueryParameterValue": value, "Reason": reason},
    )


# ---------------------------------------------------------------------- $filter and $select

_CLAUSE = re.compile(
    r"^\s*(?:startswith\(\s*(?P<sw_field>\w+)\s*,\s*'(?P<sw_value>(?:[^']|'')*)'\s*\)"
    r"|(?P<field>\w+)\s+(?P<op>eq|ne)\s+(?P<value>'(?:[^']|'')*'|true|false|-?\d+))\s*$"
)


def parse_filter(text: str) -> Callable[[dict[str, Any]], bool]:
    """An OData ``$filter`` over top-level properties, as far as the emulator supports it.

    Supported: ``startswith(prop,'x')``, ``prop eq|ne 'x'|true|false|<int>``, joined by all
    ``and`` or all ``or``. Parentheses for grouping, nested properties (``a/b``), ``gt``/
    ``lt``/``ge``/``le`` and mixing ``and`` with ``or`` are refused with a 400.
    """
    connectives = set(re.findall(r"\s(and|or)\s", text))
    if len(connectives) > 1:
        raise _bad_query("$filter", text, "the emulator cannot mix 'and' with 'or'")
    joiner = connectives.pop() if connectives else "and"
    tests = []
    for part in re.split(rf"\s{joiner}\s", text):
        match = _CLAUSE.match(part)
        if match is None:
            raise _bad_query("$filter", text, f"the emulator does not support: {part.strip()}")
        if match.group("sw_field"):
            field, prefix = match.group("sw_field"), match.group("sw_value").replace("''", "'")
            tests.append(lambda item, f=field, p=prefix: str(item.get(f, "")).startswith(p))
            continue
        raw = match.group("value")
        value: Any
        if raw.startswith("'"):
            value = raw[1:-1].replace("''", "'")
        elif raw in ("true", "false"):
            value = raw == "true"
        else:
            value = int(raw)
        field, negate = match.group("field"), match.group("op") == "ne"
        tests.append(lambda item, f=field, v=value, n=negate: (item.get(f) == v) != n)
    if joiner == "and":
        return lambda item: all(t(item) for t in tests)
    return lambda item: any(t(item) for t in tests)


def select(item: dict[str, Any], fields: str | None) -> dict[str, Any]:
    """Apply ``$select`` (top-level property names only)."""
    if not fields:
        return item
    wanted = {f.strip() for f in fields.split(",") if f.strip()}
    return {k: v for k, v in item.items() if k in wanted}


# ---------------------------------------------------------------------- the server


class BatchServer(ThreadingHTTPServer):
    """A threaded HTTP server bound to one emulated account."""

    daemon_threads = True

    def __init__(self, account: Account, key: str, page_size: int) -> None:
        super().__init__(("127.0.0.1", 0), BatchRequestHandler)
        self.account = account
        self.key = key
        self.page_size = page_size
        #: The request log and the refusals a test planned (429s, 503s).
        self.traffic = Traffic()
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (a closing pool, a finished poller) is not an error;
        anything else is printed as socketserver does."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionResetError, BrokenPipeError)):
            return
        super().handle_error(request, client_address)

    def track(self, connection: socket.socket, open_: bool) -> None:
        with self._connections_lock:
            if open_:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def close_connections(self) -> None:
        """Drop kept-alive client connections, so their handler threads end with the server."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class BatchRequestHandler(BaseHTTPRequestHandler):
    """One HTTP exchange: authenticate, route to the account, answer in Batch's format."""

    protocol_version = "HTTP/1.1"
    server: BatchServer

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        self.server.track(self.connection, False)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    # ------------------------------------------------------------------ plumbing

    def _handle(self) -> None:
        self.request_id = str(uuid.uuid4())
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        self.raw_path, self.raw_query = parts.path, parts.query
        self.query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        try:
            self._authenticate()
            self._check_api_version()
            segments = [unquote(s) for s in self.raw_path.split("/")[1:]]
            kind = operation(self.command, segments)
            self.server.traffic.admit(kind, self.command, self.path, self.body)
            self._route()
        except BatchError as error:
            self._send_error(error)
        except Exception as exc:  # an emulator bug: show it, answer like Batch's 500
            traceback.print_exc()
            self._send_error(BatchError(500, "InternalError", f"{type(exc).__name__}: {exc}"))

    def _authenticate(self) -> None:
        account = self.server.account.name
        header = self.headers.get("Authorization")
        if not header:
            raise _auth_failed("The Authorization header is missing.")
        scheme, _, credential = header.partition(" ")
        if scheme != "SharedKey":
            raise _auth_failed(f"The emulator accepts only SharedKey, not {scheme}.")
        name, _, signature = credential.partition(":")
        if name != account:
            raise _auth_failed(f"The account {name!r} is not {account!r}.")
        if not (self.headers.get("ocp-date") or self.headers.get("Date")):
            raise _auth_failed("Neither ocp-date nor Date is set.")
        headers = {k: v for k, v in self.headers.items()}
        text = string_to_sign(self.command, headers, account, self.raw_path, self.raw_query)
        expected = sign(self.server.key, text)
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            raise _auth_failed(
                f"The MAC signature found in the HTTP request '{signature}' is not the same "
                f"as any computed signature. Server used following string to sign: '{text}'."
            )

    def _check_api_version(self) -> None:
        # Batch answers a missing api-version with MissingRequiredQueryParameter and an
        # unknown one with InvalidQueryParameterValue (the .NET SDK also lists
        # UnsupportedRequestVersion; the emulator uses the documented query-parameter code).
        version = self.query.get("api-version")
        if not version:
            raise BatchError(
                400,
                "MissingRequiredQueryParameter",
                "A query parameter that's mandatory for this request is not specified.",
                {"QueryParameterName": "api-version"},
            )
        if version != API_VERSION:
            raise _bad_query("api-version", version, f"the emulator speaks only {API_VERSION}")

    def _json_body(self) -> dict[str, Any]:
        if not self.body:
            return {}
        try:
            body = json.loads(self.body)
        except ValueError as exc:
            raise BatchError(
                400,
                "InvalidRequestBody",
                "The request body is not valid JSON.",
                {"Reason": str(exc)},
            ) from exc
        if not isinstance(body, dict):
            raise BatchError(400, "InvalidRequestBody", "The request body must be a JSON object.")
        return body

    def _common_headers(self) -> None:
        self.send_header("request-id", self.request_id)
        self.send_header("DataServiceVersion", "3.0")
        client_request_id = self.headers.get("client-request-id")
        if client_request_id:
            self.send_header("client-request-id", client_request_id)

    def _send(
        self,
        status: int,
        body: bytes = b"",
        content_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self._common_headers()
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if content_type and body:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(body).encode(), JSON_TYPE, headers)

    def _send_error(self, error: BatchError) -> None:
        base = self.server.url
        body: dict[str, Any] = {
            "odata.metadata": f"{base}/$metadata#Microsoft.Azure.Batch.Protocol.Entities"
            ".Container.errors/@Element",
            "code": error.code,
            "message": {
                "lang": "en-US",
                "value": (
                    f"{error.message}\nRequestId:{self.request_id}\nTime:{rfc3339(time.time())}"
                ),
            },
        }
        if error.values:
            body["values"] = [{"key": k, "value": v} for k, v in error.values.items()]
        self._send_json(error.status, body, error.headers)

    # ------------------------------------------------------------------ routing

    def _route(self) -> None:
        segments = [unquote(s) for s in self.raw_path.split("/")[1:]]
        method = self.command
        if not segments or segments[0] != "pools":
            raise BatchError(404, "ResourceNotFound", "The specified resource does not exist.")
        if len(segments) == 1:
            if method == "POST":
                return self._create_pool()
            if method == "GET":
                return self._list_pools()
        elif len(segments) == 2:
            pool_id = segments[1]
            if method in ("GET", "HEAD"):
                return self._get_pool(pool_id)
            if method == "DELETE":
                return self._pool_action(pool_id, 202, lambda a: a.delete_pool(pool_id))
            if method == "PATCH":
                body = self._json_body()
                return self._pool_action(
                    pool_id, 200, lambda a: a.update_pool(pool_id, body, False)
                )
        elif len(segments) == 3 and method == "POST":
            return self._pool_post(segments[1], segments[2])
        elif len(segments) == 3 and segments[2] == "nodes" and method == "GET":
            return self._list_nodes(segments[1])
        elif len(segments) == 4 and segments[2] == "nodes" and method == "GET":
            return self._get_node(segments[1], segments[3])
        elif len(segments) >= 5 and segments[2] == "nodes" and segments[4] == "files":
            pool_id, node_id = segments[1], segments[3]
            if len(segments) == 5 and method == "GET":
                return self._list_files(pool_id, node_id)
            if len(segments) > 5 and method in ("GET", "HEAD"):
                return self._get_file(pool_id, node_id, "/".join(segments[5:]))
        raise BatchError(
            405 if segments[0] == "pools" else 404,
            "UnsupportedHttpVerb" if segments[0] == "pools" else "ResourceNotFound",
            f"The emulator does not implement {method} {self.raw_path}.",
        )

    def _pool_post(self, pool_id: str, action: str) -> None:
        body = self._json_body()
        accepted: dict[str, tuple[int, Callable[[Account], Any]]] = {
            "resize": (202, lambda a: a.resize_pool(pool_id, body)),
            "stopresize": (202, lambda a: a.stop_resize(pool_id)),
            "removenodes": (202, lambda a: a.remove_nodes(pool_id, body)),
            "enableautoscale": (200, lambda a: a.enable_autoscale(pool_id, body)),
            "disableautoscale": (200, lambda a: a.disable_autoscale(pool_id)),
            "updateproperties": (204, lambda a: a.update_pool(pool_id, body, True)),
        }
        if action == "evaluateautoscale":
            self._check_conditions(pool_id)
            run = self.server.account.evaluate_autoscale(pool_id, body)
            return self._send_json(200, run, self._pool_headers(pool_id))
        if action not in accepted:
            raise BatchError(404, "ResourceNotFound", f"The emulator has no pool action {action}.")
        status, operation = accepted[action]
        self._pool_action(pool_id, status, operation)

    def _check_conditions(self, pool_id: str) -> str:
        """Apply If-Match / If-None-Match to the pool's ETag; return the ETag."""
        account = self.server.account
        with account.lock:
            etag = account.pool(pool_id).etag
        if_match = self.headers.get("If-Match")
        if if_match and if_match not in ("*", etag):
            raise BatchError(412, "ConditionNotMet", "The condition specified was not met.")
        if_none_match = self.headers.get("If-None-Match")
        if if_none_match and if_none_match in ("*", etag) and self.command not in ("GET", "HEAD"):
            raise BatchError(412, "ConditionNotMet", "The condition specified was not met.")
        return etag

    def _pool_headers(self, pool_id: str) -> dict[str, str]:
        account = self.server.account
        with account.lock:
            try:
                pool = account.pool(pool_id)
            except BatchError:  # a deleted pool
                return {}
            return {
                "ETag": pool.etag,
                "Last-Modified": rfc1123(pool.last_modified),
                "DataServiceId": f"{self.server.url}/pools/{pool.id}",
            }

    def _pool_action(self, pool_id: str, status: int, operation: Callable[[Account], Any]) -> None:
        self._check_conditions(pool_id)
        operation(self.server.account)
        self._send(status, headers=self._pool_headers(pool_id))

    # ------------------------------------------------------------------ pools

    def _create_pool(self) -> None:
        account = self.server.account
        body = self._json_body()
        account.create_pool(body)
        headers = self._pool_headers(body["id"])
        headers["Location"] = headers.get("DataServiceId", "")
        self._send(201, headers=headers)

    def _get_pool(self, pool_id: str) -> None:
        account = self.server.account
        etag = self._check_conditions(pool_id)
        if self.headers.get("If-None-Match") in ("*", etag):
            return self._send(304, headers=self._pool_headers(pool_id))
        with account.lock:
            body = account.pool(pool_id).to_json(self.server.url)
        body["odata.metadata"] = f"{self.server.url}/$metadata#pools/@Element"
        self._send_json(200, select(body, self.query.get("$select")), self._pool_headers(pool_id))

    def _list_pools(self) -> None:
        account = self.server.account
        with account.lock:
            items = [p.to_json(self.server.url) for p in account.list_pools()]
        self._send_page(items, "id", "pools")

    # ------------------------------------------------------------------ nodes

    def _list_nodes(self, pool_id: str) -> None:
        account = self.server.account
        with account.lock:
            nodes = account.pool(pool_id).nodes.values()
            items = sorted((n.to_json(self.server.url) for n in nodes), key=lambda n: n["id"])
        self._send_page(items, "id", "nodes")

    def _get_node(self, pool_id: str, node_id: str) -> None:
        account = self.server.account
        with account.lock:
            body = account.node(pool_id, node_id).to_json(self.server.url)
        body["odata.metadata"] = f"{self.server.url}/$metadata#nodes/@Element"
        self._send_json(200, select(body, self.query.get("$select")))

    # ------------------------------------------------------------------ node files

    def _node_root(self, pool_id: str, node_id: str) -> Path:
        account = self.server.account
        with account.lock:
            pool_id = account.node(pool_id, node_id).pool.id
        return (account.root / pool_id / node_id).resolve()

    def _file_url(self, pool_id: str, node_id: str, name: str) -> str:
        return (
            f"{self.server.url}/pools/{quote(pool_id)}/nodes/{node_id}/files/{quote(name, safe='')}"
        )

    def _file_properties(self, path: Path) -> dict[str, Any]:
        stat = path.stat()
        return {
            "creationTime": rfc3339(stat.st_ctime),
            "lastModified": rfc3339(stat.st_mtime),
            "contentLength": 0 if path.is_dir() else stat.st_size,
            "contentType": mimetypes.guess_type(path.name)[0] or "application/octet-stream",
            "fileMode": format(stat.st_mode, "o"),
        }

    def _list_files(self, pool_id: str, node_id: str) -> None:
        root = self._node_root(pool_id, node_id)
        recursive = self.query.get("recursive", "false").lower() == "true"
        paths = (root.rglob("*") if recursive else root.glob("*")) if root.is_dir() else []
        items = []
        for path in sorted(paths):
            name = path.relative_to(root).as_posix()
            items.append(
                {
                    "name": name,
                    "url": self._file_url(pool_id, node_id, name),
                    "isDirectory": path.is_dir(),
                    "properties": self._file_properties(path),
                }
            )
        self._send_page(items, "name", "files")

    def _get_file(self, pool_id: str, node_id: str, name: str) -> None:
        root = self._node_root(pool_id, node_id)
        relative = Path(name)
        path = (root / relative).resolve()
        if relative.is_absolute() or ".." in relative.parts or not path.is_relative_to(root):
            raise BatchError(
                400,
                "InvalidUri",
                "The requested file path is outside the node's directory.",
                {"FilePath": name},
            )
        if not path.is_file():
            raise BatchError(
                404, "FileNotFound", "The specified file does not exist.", {"FilePath": name}
            )
        properties = self._file_properties(path)
        headers = {
            "ETag": f"0x{int(path.stat().st_mtime_ns):X}",
            "Last-Modified": rfc1123(path.stat().st_mtime),
            "ocp-creation-time": rfc1123(path.stat().st_ctime),
            "ocp-batch-file-isdirectory": "false",
            "ocp-batch-file-url": self._file_url(pool_id, node_id, name),
            "ocp-batch-file-mode": properties["fileMode"],
        }
        data = path.read_bytes()
        wanted = self.headers.get("ocp-range")
        if wanted:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted.strip())
            if match is None:
                raise BatchError(400, "InvalidRange", "The range specified is invalid.")
            start = int(match.group(1))
            end = int(match.group(2)) + 1 if match.group(2) else len(data)
            data = data[start:end]
        if self.command == "HEAD":
            # Content-Length must describe the file, not the (empty) HEAD body.
            self.send_response(200)
            self._common_headers()
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Type", properties["contentType"])
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return
        self._send(200, data, "application/octet-stream", headers)

    # ------------------------------------------------------------------ paging

    def _send_page(self, items: list[dict[str, Any]], key: str, kind: str) -> None:
        """One page of a list, with ``odata.nextLink`` when more items follow.

        As on Batch, a page holds at most ``maxresults`` items (1 to 1000; 1000 when not
        given, Batch's default and maximum for pools, nodes and node files); the emulator's
        ``page_size`` may make pages smaller still, as Batch may return fewer than asked.

        The link repeats the request's query (so ``$filter``, ``$select`` and ``maxresults``
        carry over; the SDK re-sends every parameter of the link and replaces api-version) and
        adds ``$skiptoken``, an opaque encoding of the last ``key`` returned.
        """
        query = self.query
        wanted = MAX_PAGE
        if "maxresults" in query:
            try:
                wanted = int(query["maxresults"])
            except ValueError:
                wanted = 0
            if not 1 <= wanted <= MAX_PAGE:
                raise _bad_query("maxresults", query["maxresults"], f"between 1 and {MAX_PAGE}")
        size = min(self.server.page_size, wanted)
        if query.get("$filter"):
            keep = parse_filter(query["$filter"])
            items = [item for item in items if keep(item)]
        after = None
        if query.get("$skiptoken"):
            token = query["$skiptoken"]
            try:
                after = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
            except ValueError as exc:
                raise _bad_query("$skiptoken", token, "not a token the emulator issued") from exc
        rest = [item for item in items if after is None or item[key] > after]
        chunk = rest[:size]
        body: dict[str, Any] = {
            "odata.metadata": f"{self.server.url}/$metadata#{kind}",
            "value": [select(item, query.get("$select")) for item in chunk],
        }
        if len(rest) > size:
            token = base64.urlsafe_b64encode(chunk[-1][key].encode()).decode().rstrip("=")
            params = {k: v for k, v in query.items() if k != "$skiptoken"}
            params["$skiptoken"] = token
            encoded = "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())
            body["odata.nextLink"] = f"{self.server.url}{self.raw_path}?{encoded}"
        self._send_json(200, body)
