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
# Connection limits, logged by the master once per client (relayhub.admission.RefusalLog).
CONNECTION_REFUSED = "connection limit: refused {client}: {reply} {reason} (more are counted)"
CONNECTIONS_REFUSED = (
    "connection limit: {count} more refused from {client} in the last {period}s ({reason})")
TIMEOUT = "timeout after {stage} from {client}"
# The slow-command deadline (relayhub.smtp.deadline): bytes kept coming, too slowly.
SLOW_COMMAND = "timeout after {stage} from {client}: {what} sent too slowly"
LOST = "lost connection after {stage} from {client}"
STORE_FAILED = "{queue_id}: queue write failed for {client}: {error}"
INTERNAL_ERROR = "internal error on {command} from {client}"
LISTENING = "{service} listening on {endpoint}"

# The master about its children (Postfix names the pid: `pid 1234 killed by signal 9`).
CHILD_DIED = "{name} pid {pid} died after {lived:.1f}s ({why}); restarting in {delay}s"
CHILD_STOPPED = "{name} stopped (pid {pid} {why})"

# Queue manager and couriers.
DELIVERY = (
    "{queue_id}: to=<{recipient}>, relay={relay}, delay={delay}, tls={tls}, "
    "verified={verified}, dsn={status}, "
    "status={verb} ({text})"
)
REMOVED = "{queue_id}: removed"
RECOVERED = "released {count} recipients left in flight by a previous run"
# Outbound TLS policies of destinations (relayhub.delivery.tls_plan).
STS_TESTING = "MTA-STS policy of {domain} (testing): {failure}; delivered to {host} anyway"
STS_REFRESH_FAILED = "MTA-STS policy of {domain} not refreshed, the cached one stays: {error}"
STS_NO_POLICY = "MTA-STS policy of {domain} not available, delivering without it: {error}"
STS_CACHE_FAILED = "MTA-STS policy cache {path} not usable: {error}"
STS_FETCHED = "MTA-STS policy of {domain} fetched: id={id}, mode={mode}, max_age={max_age}"
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

# relayhub-sendmail's maildrop, as the daemon's pickup takes it in.
PICKUP = "{queue_id}: uid={uid} from=<{sender}>, size={size}, nrcpt={nrcpt} (pickup)"
PICKUP_REFUSED = "warning: maildrop file {name} from uid={uid} discarded: {why}"

# DKIM signing at acceptance (relayhub.dkim), worded as OpenDKIM logs it.
DKIM_SIGNED = "{queue_id}: DKIM-Signature field added (s={selector}, d={domain})"
DKIM_SKIPPED = "{queue_id}: not DKIM-signed: {reason}"
DKIM_FAILED = "{queue_id}: DKIM signing failed, queued unsigned"
