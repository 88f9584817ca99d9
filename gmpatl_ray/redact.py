"""Secrets never leave the process: what is printed, logged to MLflow or queued on disk is redacted first.

Two kinds of secret are known without being told: the values of environment variables whose names say
they are secret (``HF_TOKEN``, ``MLFLOW_TRACKING_PASSWORD``, ``AWS_SECRET_ACCESS_KEY``, ``RAY_AUTH_TOKEN``),
and the credentials written into a URL (``https://user:password@host``, ``...?token=...``). Config fields
whose names say they are secret are redacted whole. The real values stay where they are needed (the
tracking client's connection); everything shown to people or stored is the redacted form.
"""

from __future__ import annotations

import io
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

SECRET_MARKERS = ("token", "password", "passwd", "secret", "key", "credential")
REDACTED = "***"

_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^\s'\"]*@")
"""Up to the last ``@`` of the URL, as HTTP clients split it: a password may hold ``@``, ``/`` or ``:``
(a path with an ``@`` in it is redacted too, which hides nothing that matters)."""
_SECRET_QUERY = re.compile(
    r"(?P<name>[?&;][^=&\s'\"]*(?:" + "|".join(SECRET_MARKERS) + r")[^=&\s'\"]*=)[^&\s'\"]+", re.IGNORECASE
)


def is_secret_name(name: str) -> bool:
    return any(marker in name.lower() for marker in SECRET_MARKERS)


def environment_secrets() -> list[str]:
    """Values of environment variables whose names say they are secret (long enough to be one), longest
    first so a secret that contains another is redacted whole."""
    values = {v for k, v in os.environ.items() if is_secret_name(k) and len(v) >= 6}
    return sorted(values, key=len, reverse=True)


def url_secrets(url: str) -> list[str]:
    """The password (or token) written into ``url``, so a copy of it seen elsewhere is redacted too."""
    match = _URL_USERINFO.match(url)
    if not match:
        return []
    userinfo = url[match.end("scheme") : match.end() - 1]
    secret = userinfo.split(":", 1)[1] if ":" in userinfo else userinfo
    return [secret] if len(secret) >= 6 else []


def scrub(text: str, secrets: list[str] | None = None) -> str:
    """``text`` without URL credentials and without the environment's secrets (or ``secrets``)."""
    text = _URL_USERINFO.sub(rf"\g<scheme>{REDACTED}@", text)
    text = _SECRET_QUERY.sub(rf"\g<name>{REDACTED}", text)
    for secret in environment_secrets() if secrets is None else secrets:
        text = text.replace(secret, REDACTED)
    return text


def scrub_tree(tree: Any, secrets: list[str] | None = None) -> Any:
    """A config tree (dicts, lists, values) with secret-named fields redacted and every string scrubbed."""
    secrets = environment_secrets() if secrets is None else secrets
    if isinstance(tree, dict):
        return {
            k: REDACTED if is_secret_name(str(k)) and v is not None else scrub_tree(v, secrets)
            for k, v in tree.items()
        }
    if isinstance(tree, list | tuple):
        return [scrub_tree(v, secrets) for v in tree]
    return scrub(tree, secrets) if isinstance(tree, str) else tree


class ScrubbedStream(io.TextIOBase):
    """A console stream that redacts each write before passing it on."""

    def __init__(self, stream, secrets: list[str]):
        self.stream, self.secrets = stream, secrets

    def write(self, text: str) -> int:
        self.stream.write(scrub(text, self.secrets))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def buffer(self):
        """The raw byte stream, for code that writes bytes (not scrubbed)."""
        return self.stream.buffer

    @property
    def encoding(self) -> str:
        return self.stream.encoding


@contextmanager
def scrubbed_console() -> Iterator[None]:
    """While open, everything this process prints (messages, warnings, tracebacks, the lines Ray forwards
    from its workers) is scrubbed on its way to the console: the backstop behind the explicit redaction."""
    secrets = environment_secrets()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = ScrubbedStream(saved[0], secrets), ScrubbedStream(saved[1], secrets)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
