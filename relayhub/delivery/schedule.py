"""When to try again: exponential back-off with jitter, lifetime expiry, delay warnings."""

from __future__ import annotations

import random

from relayhub.config import DeliverySettings

# ±20 %: spread retries so a restart or an outage's end does not retry everything at once.
JITTER = 0.2


def retry_delay(attempts: int, settings: DeliverySettings, rng: random.Random) -> float:
    """Seconds until the next try after `attempts` failed ones (1 for the first failure):
    retry_min, doubling each time, capped at retry_max, then perturbed."""
    base = min(settings.retry_min * 2 ** max(attempts - 1, 0), settings.retry_max)
    return max(1.0, float(base) * rng.uniform(1 - JITTER, 1 + JITTER))


def expired(arrival: float, now: float, settings: DeliverySettings) -> bool:
    """A recipient still deferred after max_lifetime is given up on."""
    return now - arrival >= settings.max_lifetime


def due_for_delay_warning(arrival: float, now: float, already_warned: bool,
                          settings: DeliverySettings) -> bool:
    """One warning per recipient once it has waited delay_warning; "0s" disables them."""
    return settings.delay_warning > 0 and not already_warned and (
        now - arrival >= settings.delay_warning
    )
