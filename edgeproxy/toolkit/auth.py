"""htpasswd files and password checks for basic auth (RFC 7617).

Supported entries: bcrypt (`$2y$`, `$2b$`, `$2a$`: `htpasswd -B`), checked
with the `bcrypt` package, and SHA-crypt (`$5$`, `$6$`: `mkpasswd -m
sha-512`), checked with `libpass` (the maintained fork of passlib; the
standard `crypt` module is gone in Python 3.13).  Refused at load, naming
the line: apr1/MD5 (`$apr1$`, `$1$`), `{SHA}` (unsalted SHA-1), DES crypt
and plain text, all fast to brute-force.

A check costs a bcrypt or SHA-crypt computation (docs/configuration.md has
the measured times): it runs in the worker's executor, never on the loop,
and a success is remembered by a keyed hash of the credentials (the
Authorization value), in a bounded table, so a browser that sends the
same header on every request costs one check per worker.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import threading

import bcrypt

__all__ = ["Checker", "HtpasswdError", "read_htpasswd", "verify"]

HTPASSWD_MAX = 4 << 20            # bytes
SHA_CRYPT_ROUNDS_MAX = 1_000_000  # a check must stay bounded (the default is 5000)
_BCRYPT = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
_SHA_CRYPT = re.compile(r"\$([56])\$(?:rounds=(\d+)\$)?[^$:]{0,16}\$[./A-Za-z0-9]+")
_WEAK = (("$apr1$", "apr1-MD5"), ("$1$", "MD5-crypt"), ("{SHA}", "unsalted SHA-1"),
         ("$md5", "Sun MD5"), ("{SSHA}", "salted SHA-1"))


class HtpasswdError(ValueError):
    pass


def entry_kind(hashed: str) -> str | None:
    """"bcrypt" or "sha-crypt" for a supported entry, else None."""
    if _BCRYPT.fullmatch(hashed):
        return "bcrypt"
    m = _SHA_CRYPT.fullmatch(hashed)
    if m:
        return "sha-crypt"
    return None


def read_htpasswd(path: str) -> tuple[tuple[str, str], ...]:
    """(user, hash) for each entry of an htpasswd file; HtpasswdError names
    the file and line of anything it cannot use."""
    try:
        with open(path, "rb") as f:
            data = f.read(HTPASSWD_MAX + 1)
    except OSError as exc:
        raise HtpasswdError(f"{path}: cannot be read: {exc.strerror}") from None
    if len(data) > HTPASSWD_MAX:
        raise HtpasswdError(f"{path}: larger than {HTPASSWD_MAX} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HtpasswdError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    entries: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    problems = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        where = f"{path} line {n}"
        if not sep or not user or not hashed:
            problems.append(f"{where}: not \"user:hash\"")
            continue
        if user in seen:
            problems.append(f"{where}: user {user!r} is also on line {seen[user]}")
            continue
        seen[user] = n
        kind = entry_kind(hashed)
        if kind is None:
            weak = next((name for prefix, name in _WEAK if hashed.startswith(prefix)), None)
            if weak:
                problems.append(f"{where}: user {user!r}: {weak} hashes are weak and "
                                "not supported; re-create it with `htpasswd -B` (bcrypt)")
            else:
                problems.append(f"{where}: user {user!r}: not a bcrypt ($2y$, $2b$) or "
                                "SHA-crypt ($5$, $6$) hash (plain-text and DES entries are "
                                "not supported); use `htpasswd -B`")
            continue
        m = _SHA_CRYPT.fullmatch(hashed)
        if m and m.group(2) and int(m.group(2)) > SHA_CRYPT_ROUNDS_MAX:
            problems.append(f"{where}: user {user!r}: rounds={m.group(2)} is more than "
                            f"{SHA_CRYPT_ROUNDS_MAX} (each check would take too long)")
            continue
        bm = _BCRYPT.fullmatch(hashed)
        if bm and not 4 <= int(bm.group(1)) <= 16:
            problems.append(f"{where}: user {user!r}: bcrypt cost {bm.group(1)} is outside 4-16")
            continue
        entries.append((user, hashed))
    if problems:
        raise HtpasswdError("; ".join(problems))
    if not entries:
        raise HtpasswdError(f"{path}: no users")
    return tuple(entries)


def verify(password: bytes, hashed: str) -> bool:
    """Whether password matches a supported entry (slow on purpose)."""
    if hashed.startswith("$2"):
        try:
            # htpasswd (and bcrypt itself) use the first 72 bytes; the
            # package raises beyond that
            return bcrypt.checkpw(password[:72], hashed.encode("ascii"))
        except ValueError:
            return False
    from passlib.hash import sha256_crypt, sha512_crypt

    scheme = sha512_crypt if hashed.startswith("$6$") else sha256_crypt
    try:
        return scheme.verify(password, hashed)
    except ValueError:
        return False


class Checker:
    """The users of one auth_basic and the successes seen lately (bounded)."""

    def __init__(self, entries, cache_size: int = 1024):
        self.users = dict(entries)
        self.cache_size = cache_size
        self._key = os.urandom(32)          # keys the table's hashes: never the credentials
        self._ok: dict[bytes, None] = {}    # insertion order: the oldest goes first
        self._dummy = None                  # a hash checked for unknown users (same cost)
        self._dummy_lock = threading.Lock()
        self.checks = 0                     # password checks run (for tests and stats)

    def _digest(self, value: bytes) -> bytes:
        return hashlib.blake2b(value, key=self._key, digest_size=16).digest()

    @staticmethod
    def credentials(value: bytes) -> tuple[str, bytes] | None:
        """(user, password) of an Authorization value, or None when it is
        not Basic credentials."""
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() != b"basic":
            return None
        try:
            raw = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return None
        user, sep, password = raw.partition(b":")
        if not sep:
            return None
        try:
            return user.decode("utf-8"), password
        except UnicodeDecodeError:
            return None

    def known(self, value: bytes) -> bool | None:
        """True: verified before; False: a check is needed; None: not Basic
        credentials (answer 401 at once)."""
        if self._digest(value) in self._ok:
            return True
        return None if self.credentials(value) is None else False

    def check(self, value: bytes) -> bool:
        """Verify (in the executor: it takes milliseconds)."""
        creds = self.credentials(value)
        if creds is None:
            return False
        self.checks += 1
        user, password = creds
        hashed = self.users.get(user)
        if hashed is None:
            verify(password, self._dummy_hash())   # as long as for a known user
            return False
        return verify(password, hashed)

    def _dummy_hash(self) -> str:
        with self._dummy_lock:
            if self._dummy is None:
                first = next(iter(self.users.values()))
                m = _BCRYPT.fullmatch(first)
                cost = int(m.group(1)) if m else 10
                self._dummy = bcrypt.hashpw(os.urandom(16).hex().encode(),
                                            bcrypt.gensalt(cost)).decode()
            return self._dummy

    def remember(self, value: bytes) -> None:
        """value checked out (called on the loop)."""
        if len(self._ok) >= self.cache_size:
            del self._ok[next(iter(self._ok))]
        self._ok[self._digest(value)] = None
