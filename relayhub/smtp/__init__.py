"""The SMTP side of relayhub: server protocol, command parsing, DATA framing and headers."""
