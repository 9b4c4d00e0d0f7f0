"""`relayhub-sendmail`: the Sendmail-compatible command for local programs, and the maildrop
through which it hands messages to the daemon (see relayhub.sendmail.maildrop)."""
