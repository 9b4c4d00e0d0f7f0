"""relayhub: an organisation's mail hub (RFC 5321 relay system) built on Twisted."""

__version__ = "0.1.0"
