"""Secrets out of what raylm writes and prints: credentials in URIs and secret-looking ``name=value`` pairs.

A URI keeps what says where it points (scheme, user name, host, path) and loses
what would let someone else in: the password of ``scheme://user:password@host``,
a bare token in the user part (``https://token@host``) and the values of query
parameters with secret-looking names (``?token=...``, ``&password=...``). raylm
connects with the real URI and writes or logs only :func:`redact_uri`'s form:
config copies, MLflow parameters, model cards, log lines, job listings.

Pure string rules, in ``config`` so that the job config's public dump can use
them; every layer above imports them from here.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

MASK = "***"

# Name parts (split at ``.``, ``_``, ``-``) that mark a value as a secret. A name whose last part says it holds
# where a secret is, not the secret (``RAY_AUTH_TOKEN_PATH``, ``serve.api_key_file``), is not one.
SECRET_NAME_PARTS = frozenset({"password", "passwd", "pwd", "secret", "token", "key", "apikey", "credential",
                               "credentials", "signature", "sig", "auth"})
NOT_SECRET_LAST_PARTS = frozenset({"path", "file", "dir", "env", "id", "name", "uri", "url"})
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_ASSIGNMENT = re.compile(r"(?P<name>[A-Za-z_][\w.-]*)=(?P<value>[^\s'\"&]+)")


def is_secret_name(name: str) -> bool:
    """True for a parameter, variable or config key whose value is a secret (``serve.api_key``, ``HF_TOKEN``)."""
    parts = [part for part in re.split(r"[._-]+", name.strip("-").lower()) if part]
    if not parts or parts[-1] in NOT_SECRET_LAST_PARTS:
        return False
    return any(part in SECRET_NAME_PARTS for part in parts)


def _redact_query(query: str) -> str:
    pairs = []
    for pair in query.split("&"):
        name, equals, value = pair.partition("=")
        pairs.append(f"{name}={MASK}" if equals and value and is_secret_name(name) else pair)
    return "&".join(pairs)


def redact_uri(uri: str) -> str:
    """``uri`` with the password or token in its user part and its secret query values replaced by :data:`MASK`.

    A string that is not a ``scheme://`` URI, or one without credentials, comes back unchanged.
    """
    if "://" not in uri:
        return uri
    scheme, _, rest = uri.partition("://")
    authority_end = len(rest)
    for separator in "/?#":
        position = rest.find(separator)
        if position != -1:
            authority_end = min(authority_end, position)
    authority, tail = rest[:authority_end], rest[authority_end:]
    if "@" in authority:
        userinfo, _, host = authority.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        # user:password keeps the user name; a lone user part over HTTP is a token more often than a name.
        authority = f"{user}:{MASK}@{host}" if colon else f"{MASK}@{host}"
    try:
        query = urlsplit(f"{scheme}://host{tail}").query
    except ValueError:
        query = ""
    if query:
        tail = tail.replace(f"?{query}", f"?{_redact_query(query)}", 1)
    return f"{scheme}://{authority}{tail}"


def has_credentials(uri: str) -> bool:
    """True when :func:`redact_uri` would hide something in ``uri``."""
    return redact_uri(uri) != uri


def is_redacted(uri: str) -> bool:
    """True for a URI that went through :func:`redact_uri` and lost a credential (it holds the mask)."""
    return "://" in uri and (f":{MASK}@" in uri or f"://{MASK}@" in uri or f"={MASK}" in uri)


def redact_text(text: str) -> str:
    """Free text (a command line, a message) with every URI redacted and every ``secret_name=value`` masked."""
    text = _URI.sub(lambda match: redact_uri(match.group(0)), text)

    def mask(match: re.Match) -> str:
        if not is_secret_name(match.group("name")) or match.group("value") == MASK:
            return match.group(0)
        return f"{match.group('name')}={MASK}"

    return _ASSIGNMENT.sub(mask, text)


def redact_values(value: Any) -> Any:
    """A copy of plain data (dicts, lists, strings) with every string that holds a URI redacted."""
    if isinstance(value, dict):
        return {key: redact_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_values(item) for item in value]
    if isinstance(value, str) and "://" in value:
        return _URI.sub(lambda match: redact_uri(match.group(0)), value)
    return value
