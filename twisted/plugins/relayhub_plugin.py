"""twistd plugin: makes `twistd relayhub` start the mail hub (see relayhub.tap)."""

from twisted.application.service import ServiceMaker

# Kept free of reactor imports: twistd imports every plugin before it picks a reactor.
relayhub = ServiceMaker(
    "relayhub",
    "relayhub.tap",
    "relayhub mail hub: ESMTP relay, durable queue, Maildir and POP3",
    "relayhub",
)
