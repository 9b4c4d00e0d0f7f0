"""The hub's log lines, named once here (Postfix style) so operators can grep for them.

Each constant is a `twisted.logger` format string; its fields travel as structured
event keys too, so the JSON log carries `queue_id`, `client` and friends as separate values.
"""

from __future__ import annotations

from twisted.logger import Logger

SMTPD = Logger(namespace="relayhub.smtpd")
QMGR = Logger(namespace="relayhub.qmgr")

CONNECT = "connect from {client}"
DISCONNECT = "disconnect from {client} {counts}"
QUEUED = "{queue_id}: from=<{sender}>, size={size}, nrcpt={nrcpt}, client={client}"
REJECT = (
    "NOQUEUE: reject: {stage} from {client}: {reply}; "
    "from=<{sender}> to=<{recipient}> proto={proto} helo=<{helo}>"
)
REFUSED_MESSAGE = "{queue_id}: reject: DATA from {client}: {reply}; from=<{sender}>"
LIMIT = "{reason} from {client}: {reply}"
TIMEOUT = "timeout after {stage} from {client}"
LOST = "lost connection after {stage} from {client}"
STORE_FAILED = "{queue_id}: queue write failed for {client}: {error}"
INTERNAL_ERROR = "internal error on {command} from {client}"
LISTENING = "{service} listening on {endpoint}"

# Queue manager and couriers.
DELIVERY = (
    "{queue_id}: to=<{recipient}>, relay={relay}, delay={delay}, tls={tls}, dsn={status}, "
    "status={verb} ({text})"
)
REMOVED = "{queue_id}: removed"
RECOVERED = "released {count} recipients left in flight by a previous run"
NOTICE = "{queue_id}: sender {kind} notification: {notice_id}"
DOUBLE_BOUNCE = "{queue_id}: undeliverable postmaster notification discarded"

# The shared queue database (PostgreSQL): said once when it goes away, once when it is back.
QUEUE_DB_DOWN = "queue database unavailable, mail is refused with 451 until it returns: {error}"
QUEUE_DB_UP = "queue database available again"

# Aliases (relayhub.aliases) and the address lookups they answer.
ALIASES = Logger(namespace="relayhub.aliases")
ALIASES_LOADED = "aliases: loaded {path}: {aliases} aliases, {includes} include files"
ALIASES_BROKEN = "aliases: {path} not loaded, {state}: {problem}"
ALIASES_FAILED = "aliases: cannot check {path}"
LOOKUP = "{command} {query} from {client}: {reply}"

# STARTTLS and AUTH in the SMTP server (TLS details as Postfix logs them).
TLS_ESTABLISHED = "TLS connection established from {client}: {tls}"
STARTTLS_PIPELINED = "{client}: discarded {size} bytes sent after STARTTLS before the handshake"
AUTH_OK = "{client}: sasl_method={method}, sasl_username={user}"
AUTH_FAILED = "warning: {client}: SASL {method} authentication failed: user=<{user}>"
QUEUED_AUTHENTICATED = QUEUED + ", sasl_method={method}, sasl_username={user}"
