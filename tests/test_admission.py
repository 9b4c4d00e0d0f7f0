"""Connection limits counted by the master, with blocks of slots lent to workers for their
trusted clients (relayhub.admission): the total is never exceeded, spare slots go back."""

from __future__ import annotations

from twisted.internet import defer

from relayhub.admission import ConnectionCounter, LentSlots, quota_block
from relayhub.config import parse_settings


def counter(max_connections: int, per_ip: int = 50) -> ConnectionCounter:
    settings = parse_settings({"smtp": {"max_connections": max_connections,
                                        "max_connections_per_ip": per_ip}}, "test")
    return ConnectionCounter(settings.smtp)


def worker(master: ConnectionCounter, name: str) -> LentSlots:
    block = quota_block(master.limits.max_connections)
    return LentSlots(block, lambda wanted, in_use: defer.succeed(
        master.lend(name, wanted, in_use)), lambda n, in_use: master.give_back(name, n, in_use))


def taken(slots: LentSlots) -> bool:
    result: list[bool] = []
    slots.take().addCallback(result.append)
    return result[0]


def test_blocks_are_a_few_percent_of_the_limit_and_one_for_small_limits() -> None:
    assert quota_block(2000) == 31
    assert quota_block(100) == 1 and quota_block(5) == 1


def test_lent_slots_and_counted_sessions_never_exceed_the_total() -> None:
    master = counter(10)
    a, b = worker(master, "worker-1"), worker(master, "worker-2")
    assert [taken(a) for _ in range(6)] == [True] * 6
    assert master.admit("worker-2", "smtp", "192.0.2.1", exempt=False) == ""
    assert [taken(b) for _ in range(4)] == [True, True, True, False]
    assert master.admit("worker-2", "smtp", "192.0.2.2", False) == "too many connections"


def test_a_small_limit_is_exact_across_workers() -> None:
    # Blocks of one: a slot freed on one worker goes back at once, so the other can use it.
    master = counter(2)
    a, b = worker(master, "worker-1"), worker(master, "worker-2")
    assert taken(a) and taken(a) and not taken(b)
    a.put_back()
    assert taken(b)
    assert not taken(a)


def test_spare_slots_beyond_a_block_go_back_and_status_counts_sessions() -> None:
    master = counter(2000)
    a = worker(master, "worker-1")
    for _ in range(100):
        assert taken(a)
    for _ in range(100):
        a.put_back()
    assert a.slots <= a.block
    a.report()
    assert master.totals()["smtp"] == 0
    assert taken(a)
    a.report()
    assert master.totals()["smtp"] == 1


def test_a_dead_worker_returns_its_slots() -> None:
    master = counter(2)
    a, b = worker(master, "worker-1"), worker(master, "worker-2")
    assert taken(a) and taken(a) and not taken(b)
    master.forget("worker-1")
    assert taken(b)


def test_idle_lent_slots_are_taken_back_before_anyone_is_refused() -> None:
    master = counter(100 * 64)  # blocks of 64
    a = worker(master, "worker-1")
    assert taken(a)
    a.put_back()  # one block spare on worker-1, idle
    others = [master.admit("worker-2", "smtp", f"192.0.2.{n % 250}.{n}", exempt=False)
              for n in range(100 * 64 - 64)]
    assert set(others) == {""}
    assert master.admit("worker-2", "smtp", "198.51.100.1", False) == "too many connections"
    assert master.idle_lent() == ["worker-1"]
    # The master asks worker-1 for its idle slots (the Reclaim command), then decides again.
    returned = a.reclaim()
    master.give_back("worker-1", returned, a.in_use)
    assert returned == 64 and a.slots == 0 and master.idle_lent() == []
    assert master.admit("worker-2", "smtp", "198.51.100.1", False) == ""


def test_a_burst_of_trusted_clients_asks_for_one_block_at_a_time() -> None:
    master = counter(100 * 64)
    asked: list[defer.Deferred[int]] = []

    def ask(wanted: int, in_use: int) -> defer.Deferred[int]:
        answer: defer.Deferred[int] = defer.Deferred()
        asked.append(answer)
        return answer.addCallback(lambda _: master.lend("worker-1", wanted, in_use))

    slots = LentSlots(64, ask, lambda n, in_use: master.give_back("worker-1", n, in_use))
    results: list[bool] = []
    for _ in range(100):
        slots.take().addCallback(results.append)
    assert len(asked) == 1  # a hundred clients, one request in flight
    asked[0].callback(None)
    assert len(asked) == 2 and len(results) == 64  # the rest ask for the next block
    asked[1].callback(None)
    assert results == [True] * 100 and slots.in_use == 100 and slots.slots == 128
