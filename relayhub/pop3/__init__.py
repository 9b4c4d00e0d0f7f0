"""POP3 service (SPEC §7): a Maildir maildrop, authentication, the protocol, and its factory."""
