"""Memcached server addresses: ``"HOST:PORT"`` specs, as a layer's ``servers`` setting
gives them, parsed into ``(node_id, host, port)``."""

from __future__ import annotations

from collections.abc import Sequence

from .._errors import ConfigError

__all__ = ["DEFAULT_PORT", "parse_server", "parse_servers"]

#: The port of a spec that names none.
DEFAULT_PORT = 11211


def parse_servers(servers: object) -> list[tuple[str, str, int]]:
    """Parse ``servers``: ``"HOST:PORT"`` strings as a sequence or one comma-separated
    string. Returns ``(node_id, host, port)`` for each, in order. Raises
    :class:`~cachechain.ConfigError` naming ``servers`` for a bad spec, a server
    listed twice, or none at all."""
    specs = servers.split(",") if isinstance(servers, str) else servers
    if isinstance(specs, (bytes, bytearray)) or not isinstance(specs, Sequence):
        raise ConfigError(f"servers must be a str or a sequence of str, got {servers!r}")
    parsed: list[tuple[str, str, int]] = []
    seen: set[str] = set()
    for spec in specs:
        node_id, host, port = parse_server(spec)
        if node_id in seen:
            raise ConfigError(f"servers lists {node_id} twice")
        seen.add(node_id)
        parsed.append((node_id, host, port))
    if not parsed:
        raise ConfigError("servers must name at least one server")
    return parsed


def parse_server(spec: object) -> tuple[str, str, int]:
    """Parse ``"HOST:PORT"`` (``"[IPv6]:PORT"``; the port defaults to 11211).

    Returns ``(node_id, host, port)``, where ``node_id`` is the normalized spec. Raises
    :class:`~cachechain.ConfigError` naming ``servers``.
    """
    if not isinstance(spec, str):
        raise ConfigError(f"servers entries must be 'HOST:PORT' strings, got {spec!r}")
    host, port_text = _split(spec, spec.strip())
    if not host or any(c.isspace() or c in "/[]" for c in host):
        raise ConfigError(f"servers entry {spec!r} has no valid host")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"servers entry {spec!r} has an invalid port {port_text!r}")
    port = int(port_text)
    node_id = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return node_id, host, port


def _split(spec: str, text: str) -> tuple[str, str]:
    """Split ``text`` (the stripped ``spec``) into its host and its port's text."""
    if text.startswith("["):
        close = text.find("]")
        host, rest = text[1:close], text[close + 1 :]
        if close < 0 or not host or (rest and not rest.startswith(":")):
            raise ConfigError(f"servers entry {spec!r} is not '[IPv6]:PORT'")
        return host, rest[1:] if rest else str(DEFAULT_PORT)
    if text.count(":") > 1:
        raise ConfigError(f"servers entry {spec!r}: write an IPv6 address as '[ADDR]:PORT'")
    host, sep, port_text = text.partition(":")
    return host, port_text if sep else str(DEFAULT_PORT)
