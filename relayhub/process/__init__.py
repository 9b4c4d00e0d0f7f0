"""The multi-process daemon (Postfix's split): a master that binds the listening sockets and
supervises protocol workers and one queue manager, all talking AMP to it."""
