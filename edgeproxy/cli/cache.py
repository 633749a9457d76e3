"""`edgeproxy cache`: purge, inspect, preload and warm the shared cache from the command line."""
from __future__ import annotations

import asyncio
import hashlib
import json
import mimetypes
import os
import ssl
import time
from collections import Counter
from collections.abc import Callable
from urllib.parse import quote, urlsplit

import click

from edgeproxy.cache import bus, policy
from edgeproxy.cache.keys import cache_key, key_for_url, key_prefix_for_url
from edgeproxy.cache.store import CacheError, CacheStore
from edgeproxy.config import Config, ConfigError, ListenConfig, RouteConfig, load_config
from edgeproxy.http._path import normalize_path
from edgeproxy.http._pure import ParseError

__all__ = ["cache"]

_CONFIG_OPTION = click.option(
    "-c", "--config", "config_path", metavar="FILE", required=True,
    type=click.Path(dir_okay=False), help="The edgeproxy TOML configuration (its [cache] section).")

# Compressed files keep their compressed type: serving a .gz as
# "Content-Encoding: gzip" would break clients that did not ask for it.
_ENCODED_TYPES = {"gzip": "application/gzip", "bzip2": "application/x-bzip2",
                  "xz": "application/x-xz", "br": "application/x-brotli",
                  "compress": "application/x-compress"}


def _read_config(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _open_store(config: Config) -> CacheStore:
    if config.cache is None:
        raise click.ClickException(f"{config.source or 'the configuration'} has no [cache] section")
    try:
        return CacheStore.open(config.cache)
    except CacheError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
def cache() -> None:
    """Purge, inspect, preload and warm the shared HTTP cache.

    \b
    Examples:
      edgeproxy cache purge -c edgeproxy.toml https://example.com/page
      edgeproxy cache purge -c edgeproxy.toml --prefix https://example.com/static/ --soft
      edgeproxy cache purge -c edgeproxy.toml --tag product-42
      edgeproxy cache stats -c edgeproxy.toml
      edgeproxy cache list -c edgeproxy.toml --prefix https://example.com/static/
      edgeproxy cache load -c edgeproxy.toml ./public --prefix /static/ --host example.com
      edgeproxy cache load -c edgeproxy.toml ./public --prefix /static/ --delete
      edgeproxy cache warm -c edgeproxy.toml urls.txt

    These commands work while the proxy runs: every process shares the cache file.
    """


@cache.command()
@_CONFIG_OPTION
@click.argument("url", required=False)
@click.option("--prefix", metavar="URL-PREFIX",
              help="Purge every URL starting with this, e.g. https://example.com/static/.")
@click.option("--tag", "tags", metavar="TAG", multiple=True,
              help="Purge the responses that listed TAG in Surrogate-Key or Cache-Tag "
                   "(repeatable).")
@click.option("--soft", is_flag=True,
              help="Mark stale instead of removing: the next request revalidates, and "
                   "stale-while-revalidate / stale-if-error may still serve it.")
def purge(config_path: str, url: str | None, prefix: str | None, tags: tuple[str, ...],
          soft: bool) -> None:
    """Remove (or mark stale) cached responses: one URL (all its variants),
    every URL under a prefix, or every response with a tag. With
    cache.purge_bus, every edge on the bus does the same."""
    if sum(map(bool, (url, prefix, tags))) != 1:
        raise click.UsageError("give exactly one of URL, --prefix URL-PREFIX or --tag TAG")
    if url:
        key = key_for_url(url)
        if key is None:
            raise click.BadParameter(f"{url!r} is not an absolute http:// or https:// URL",
                                     param_hint="URL")
    elif prefix:
        key = key_prefix_for_url(prefix)
        if key is None:
            raise click.BadParameter(f"{prefix!r} is not an http:// or https:// URL prefix",
                                     param_hint="--prefix")
    config = _read_config(config_path)
    store = _open_store(config)
    if url:
        purges = [bus.Purge("url", key, soft)]
    elif prefix:
        purges = [bus.Purge("prefix", key, soft)]
    else:
        purges = [bus.Purge("tag", tag.encode("utf-8"), soft) for tag in tags]
    try:
        n = sum(bus.apply(store, p) for p in purges)
        if config.cache.purge_bus:
            # the edge's bus process publishes it to the other edges
            bus.announce(store, purges)
    except CacheError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        store.close()
    what = "marked stale" if soft else "purged"
    click.echo(f"{what} {n} {'entry' if n == 1 else 'entries'}"
               + ("; sent to the purge bus" if config.cache.purge_bus else ""))


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


@cache.command()
@_CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the counters as one JSON object.")
def stats(config_path: str, as_json: bool) -> None:
    """Show the cache counters, summed over every process that used the cache."""
    store = _open_store(_read_config(config_path))
    try:
        counters = store.stats()
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps(counters, sort_keys=True))
        return
    lookups = counters["hits"] + counters["misses"]
    ratio = f"{100 * counters['hits'] / lookups:.1f}%" if lookups else "-"
    used = counters["bytes"]
    rows = [
        ("entries", str(counters["entries"])),
        ("bytes", (f"{_size(used)} of {_size(counters['max_size'])} "
                  f"({100 * used / counters['max_size']:.1f}%)")),
        ("file", _size(counters["file_bytes"])),
        ("hits", str(counters["hits"])),
        ("misses", str(counters["misses"])),
        ("hit ratio", ratio),
    ] + [(name.replace("_", " "), str(counters[name]))
         for name in ("stale", "revalidated", "stores", "store_failures", "evictions", "purges",
                      "hot_hits", "corrupt")]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        click.echo(f"{label + ':':<{width + 1}} {value}")


def _serving_listener(config: Config) -> ListenConfig:
    """The listener clients get the routes' answers from: the first one that does
    not only redirect to HTTPS (`redirect_http`), so the HTTPS one behind a
    redirecting :80."""
    for listener in config.listen:
        if not listener.redirect_http:
            return listener
    return config.listen[0]  # pragma: no cover - the loader requires a TLS listener then


def _route_for(config: Config, host: str, path: str) -> tuple[int, RouteConfig] | None:
    """(index, route) that a request for host and path takes, as the router
    chooses it: an exact host, then a wildcard, then routes without a host;
    within those, the longest path prefix.  None when no route takes it."""
    name = host.lower()
    if name.startswith("["):
        name = name[:name.find("]") + 1]
    else:
        name = name.partition(":")[0]
    name = name.rstrip(".")
    try:
        normal = normalize_path(path.encode("latin-1")).decode("latin-1")
    except (ParseError, UnicodeEncodeError):
        normal = path

    def kind(route: RouteConfig) -> int | None:
        if route.host is None:
            return 2
        if route.host.startswith("*."):
            return 1 if name.endswith(route.host[1:]) and len(name) > len(route.host) - 1 else None
        return 0 if route.host == name else None

    for wanted in (0, 1, 2):
        matches = [(len(r.path), i, r) for i, r in enumerate(config.routes)
                   if kind(r) == wanted and normal.startswith(r.path)]
        if matches:
            _, i, route = max(matches, key=lambda m: (m[0], -m[1]))
            return i, route
    return None


def _listener_origin(listener: ListenConfig) -> tuple[str, str]:
    """(scheme, host[:port]) clients use to reach a listener, as far as we can tell."""
    scheme = "https" if listener.tls else "http"
    host = listener.host or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    default = 443 if scheme == "https" else 80
    return scheme, host if listener.port == default else f"{host}:{listener.port}"


def _files(directory: str) -> list[str]:
    """The regular files under directory, sorted; hidden names (".x") skipped."""
    found = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = os.path.join(root, name)
            if not name.startswith(".") and os.path.isfile(path):
                found.append(path)
    return found


def _content_type(path: str) -> str:
    kind, encoding = mimetypes.guess_type(path, strict=False)
    if encoding:
        return _ENCODED_TYPES.get(encoding, "application/octet-stream")
    return kind or "application/octet-stream"


def _file_digest(path: str, chunk: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _load_file(store: CacheStore, path: str, key: bytes, max_age: int) -> str:
    """Store one file; returns "stored", "unchanged" or "too-large"."""
    st = os.stat(path)
    if st.st_size > store.max_object:
        return "too-large"
    etag = b'"%s"' % _file_digest(path, store.chunk_size)[:32].encode("ascii")
    cache_control = b"max-age=%d" % max_age
    now = time.time()
    existing = store.get(key)
    if (existing is not None and existing.etag == etag
            and (b"cache-control", cache_control) in
            [(n.lower(), v) for n, v in existing.headers]
            and policy.lookup_decision(existing, [], now).action == policy.Action.FRESH):
        return "unchanged"
    headers = [
        (b"Content-Type", _content_type(path).encode("ascii")),
        (b"Date", policy.format_http_date(now)),
        (b"Last-Modified", policy.format_http_date(st.st_mtime)),
        (b"ETag", etag),
        (b"Cache-Control", cache_control),
    ]
    entry = policy.new_entry(key, [], 200, b"OK", headers, now, now)
    writer = store.begin(entry)
    with open(path, "rb") as f:
        while block := f.read(store.chunk_size):
            writer.write(block)
    if writer.commit():
        return "stored"
    return writer.failed or "failed"


@cache.command()
@_CONFIG_OPTION
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--prefix", default="/", show_default=True, metavar="PATH",
              help="The URL path the directory is served under, e.g. /static/.")
@click.option("--host", metavar="HOST[:PORT]",
              help="The host the URLs are requested with (the Host header clients send, "
                   "with its port when not the scheme's default). Default: the address and "
                   "port of the listener serving the routes (the first one that does not "
                   "only redirect to HTTPS).")
@click.option("--scheme", type=click.Choice(["http", "https"]), default=None,
              help="Default: that listener's: https when it has TLS, else http.")
@click.option("--max-age", type=click.IntRange(min=0), default=3600, show_default=True,
              metavar="SECONDS", help="The Cache-Control max-age the entries get.")
@click.option("--delete", is_flag=True,
              help="Also remove the entries under PREFIX (for this scheme and host) that no "
                   "file under DIRECTORY stands for any more: files deleted or renamed "
                   "since the last load, or now too large. Use a PREFIX only DIRECTORY serves.")
def load(config_path: str, directory: str, prefix: str, host: str | None, scheme: str | None,
         max_age: int, delete: bool) -> None:
    """Store every file under DIRECTORY as a cached 200 response.

    Each file becomes PREFIX + its relative path, with Content-Type from
    its extension, a strong ETag from its SHA-256, Last-Modified from its
    modification time and Cache-Control: max-age. Running it again stores
    only files that changed or whose entry went stale. Hidden files are
    skipped, as are files larger than the cache's largest object. A
    warning says so when no route with cache = true serves PREFIX on
    that host (the entries would never be answered).
    """
    config = _read_config(config_path)
    default_scheme, default_host = _listener_origin(_serving_listener(config))
    scheme = scheme or default_scheme
    host = host or default_host
    if not prefix.startswith("/"):
        prefix = "/" + prefix
    if not prefix.endswith("/"):
        prefix += "/"
    if not host.isascii():
        raise click.BadParameter(f"{host!r}: give the host in ASCII (IDNA) form",
                                 param_hint="--host")
    served = _route_for(config, host, prefix)
    if served is None or not served[1].cache:
        why = (f"route[{served[0]}] takes it but has no cache = true" if served
               else "no route takes it")
        click.echo(f"warning: {scheme}://{host}{prefix}: {why}; these entries would never "
                   "be served", err=True)
    files = _files(directory)
    store = _open_store(config)
    outcome: Counter[str] = Counter()
    stored_bytes = 0
    kept: set[bytes] = set()
    removed = 0
    try:
        with click.progressbar(files, label="loading", show_pos=True,
                               item_show_func=lambda p: os.path.relpath(p, directory) if p else None
                               ) as bar:
            for path in bar:
                rel = os.path.relpath(path, directory).replace(os.sep, "/")
                target = (prefix + quote(rel, safe="/-._~!$&'()*+,;=:@")).encode("ascii")
                key = cache_key(scheme.encode("ascii"), host.encode("ascii"), target)
                try:
                    result = _load_file(store, path, key, max_age)
                except OSError as exc:
                    click.echo(f"\n{path}: cannot read: {exc.strerror}", err=True)
                    result = "unreadable"
                except CacheError as exc:
                    raise click.ClickException(str(exc)) from None
                outcome[result] += 1
                if result in ("stored", "unchanged"):
                    kept.add(key)
                if result == "stored":
                    stored_bytes += os.path.getsize(path)
        if delete:
            under = cache_key(scheme.encode("ascii"), host.encode("ascii"),
                              prefix.encode("ascii"))
            gone = sorted({e.key for e in store.entries(under)} - kept)
            try:
                removed = sum(store.delete(key) for key in gone)
            except CacheError as exc:
                raise click.ClickException(str(exc)) from None
    finally:
        store.close()
    skipped = {k: v for k, v in outcome.items() if k not in ("stored", "unchanged")}
    summary = (f"{outcome['stored']} stored ({_size(stored_bytes)}), "
               f"{outcome['unchanged']} unchanged")
    if skipped:
        summary += ", skipped: " + ", ".join(f"{n} {why}" for why, n in sorted(skipped.items()))
    if delete:
        summary += f", {removed} removed ({'entry' if removed == 1 else 'entries'} for files gone)"
    click.echo(f"{len(files)} files under {scheme}://{host}{prefix}: {summary}")


@cache.command(name="list")
@_CONFIG_OPTION
@click.option("--prefix", metavar="URL-PREFIX",
              help="Only the keys starting with this, e.g. https://example.com/static/.")
@click.option("-l", "--long", "long_format", is_flag=True,
              help="Also the status, body size, age and freshness of each entry.")
def list_(config_path: str, prefix: str | None, long_format: bool) -> None:
    """Show the stored keys (one per line, in key order; a response stored in
    several variants, by Vary, shows once per variant)."""
    key_prefix = b""
    if prefix:
        key_prefix = key_prefix_for_url(prefix)
        if key_prefix is None:
            raise click.BadParameter(f"{prefix!r} is not an http:// or https:// URL prefix",
                                     param_hint="--prefix")
    store = _open_store(_read_config(config_path))
    now = time.time()
    n = 0
    try:
        for entry in store.entries(key_prefix):
            n += 1
            key = entry.key.decode("latin-1")
            if entry.variant:
                key += f"  (vary: {b', '.join(entry.vary).decode('latin-1')})"
            if long_format:
                age = policy.current_age(entry, now)
                fresh = age < entry.lifetime and not entry.invalidated and not entry.no_cache
                state = "fresh" if fresh else "stale"
                click.echo(f"{entry.status} {entry.body_length:>10} {int(age):>7}s "
                           f"{state:<5} {key}")
            else:
                click.echo(key)
    except CacheError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        store.close()
    click.echo(f"{n} {'entry' if n == 1 else 'entries'}", err=True)


# --- warm -------------------------------------------------------------------------------

class _WarmResult:
    def __init__(self) -> None:
        self.statuses: Counter[int] = Counter()
        self.cache: Counter[str] = Counter()   # "hit", "stored", "not stored"
        self.errors: list[str] = []


async def _fetch(listener: ListenConfig, scheme: str, host: str, target: str,
                 timeout: float) -> tuple[int, str]:
    """GET target from the listener; (status, Cache-Status value) once the body is read."""
    ssl_context = None
    if listener.tls:
        # Our own listener, reached by address: check nothing, send the URL's
        # host as SNI so the right certificate and route are chosen.
        ssl_context = ssl.create_default_context()
        ssl_context.check_hostname = False
        ssl_context.verify_mode = ssl.CERT_NONE
    address = listener.host or "127.0.0.1"
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        address, listener.port, ssl=ssl_context,
        server_hostname=host.rsplit(":", 1)[0].strip("[]") if ssl_context else None), timeout)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n"
                     "User-Agent: edgeproxy-cache-warm\r\nAccept: */*\r\n"
                     "Connection: close\r\n\r\n".encode("latin-1"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise ValueError(f"not an HTTP response: {lines[0][:60]!r}")
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name:
                fields.setdefault(name.strip().lower(), value.strip())
        length = fields.get("content-length")
        if length is not None and length.isdigit():
            await asyncio.wait_for(reader.readexactly(int(length)), timeout)
        else:
            while await asyncio.wait_for(reader.read(65536), timeout):
                pass
        return int(parts[1]), fields.get("cache-status", "")
    finally:
        writer.close()


async def _warm(listener: ListenConfig, scheme: str, host: str, urls: list[str],
                concurrency: int, timeout: float, advance: Callable[[], None]) -> _WarmResult:
    result = _WarmResult()
    queue: asyncio.Queue[str] = asyncio.Queue()
    for url in urls:
        queue.put_nowait(url)

    async def worker() -> None:
        while not queue.empty():
            url = queue.get_nowait()
            url_host, target = host, url
            if "://" in url:
                parts = urlsplit(url)
                url_host = parts.netloc.rpartition("@")[2]
                target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            try:
                status, cache_status = await _fetch(listener, scheme, url_host, target, timeout)
            except (TimeoutError, OSError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError, ValueError) as exc:
                result.errors.append(f"{url}: {type(exc).__name__}: {exc}")
            else:
                result.statuses[status] += 1
                member = cache_status.rsplit(",", 1)[-1]
                if "; hit" in member:
                    result.cache["hit"] += 1
                elif "-miss;" in member and "detail=" not in member:
                    # storable: `stored` itself is said only when the response
                    # came whole with its head; the whole body was read here
                    result.cache["stored"] += 1
            advance()

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(urls)))))
    return result


@cache.command()
@_CONFIG_OPTION
@click.argument("urls_file", metavar="URLS-FILE", type=click.File("r"))
@click.option("--host", metavar="HOST[:PORT]",
              help="Host header for lines that are paths (/x) rather than URLs. "
                   "Default: the serving listener's address (as for load).")
@click.option("--concurrency", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Requests in flight at once.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              metavar="SECONDS", help="For connecting and between reads.")
def warm(config_path: str, urls_file, host: str | None, concurrency: int,
         timeout: float) -> None:
    """GET each URL of URLS-FILE (one per line, "#" comments) through the
    proxy's serving listener (the first one that does not only redirect to
    HTTPS), so that cacheable responses get stored.

    Lines are absolute URLs (their host goes in the Host header) or paths.
    Exits 1 if any request failed (no response at all).
    """
    config = _read_config(config_path)
    listener = _serving_listener(config)
    if listener.port == 0:
        raise click.ClickException("the serving listener has port 0; nothing to connect to")
    scheme, default_host = _listener_origin(listener)
    urls = [line.strip() for line in urls_file
            if line.strip() and not line.lstrip().startswith("#")]
    with click.progressbar(length=len(urls), label="warming", show_pos=True) as bar:
        result = asyncio.run(_warm(listener, scheme, host or default_host, urls, concurrency,
                                   timeout, lambda: bar.update(1)))
    for error in result.errors[:10]:
        click.echo(error, err=True)
    if len(result.errors) > 10:
        click.echo(f"... and {len(result.errors) - 10} more failures", err=True)
    ok = sum(result.statuses.values())
    statuses = ", ".join(f"{status}: {n}" for status, n in sorted(result.statuses.items()))
    click.echo(f"{len(urls)} URLs: {ok} answered ({statuses or 'none'}), "
               f"{len(result.errors)} failed; {result.cache['hit']} already cached, "
               f"{result.cache['stored']} stored")
    if result.errors:
        raise SystemExit(1)
