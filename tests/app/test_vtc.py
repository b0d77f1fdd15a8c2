"""Fair serving by virtual token counters (``app/vtc.py``): counters, the lift on arrival, the order a gate and the
engine serve in, no starvation, and no charge for work never done. The last test runs the real llama.cpp engine:
a second party is served ahead of a flooder's queue."""

from __future__ import annotations

import asyncio

import pytest

from app.admission import FairGate
from app.vtc import SWEEP_EVERY, TokenCounters
from feedback.events import Sampling


def test_prompt_and_generated_tokens_are_charged_at_the_papers_weights():
    c = TokenCounters()
    c.charge("a", prefill=10)
    c.charge("a", decode=3)
    c.charge("b", prefill=0, decode=0)
    assert c.counter("a") == 10 * 1.0 + 3 * 2.0
    assert c.counter("b") == 0.0
    with pytest.raises(ValueError):
        TokenCounters(prefill_weight=-1)


def test_a_party_entering_is_lifted_to_the_lowest_counter_present_and_idling_earns_nothing():
    c = TokenCounters()
    c.enter("heavy")
    c.enter("light")
    c.charge("heavy", decode=50)  # 100
    c.charge("light", prefill=30)  # 30
    c.enter("new")
    assert c.counter("new") == 30  # the lowest present, not zero: no head start over "light"
    c.charge("new", decode=100)
    c.enter("new")  # a party already present is not lifted again, nor lowered
    assert c.counter("new") == 230
    for party in ("new", "new", "light", "heavy"):
        c.exit(party)
    assert c.present() == {}
    assert c.floor() == 100  # the highest lowest-counter-present so far: the virtual time
    c.enter("light")  # back after idling in an empty system: no credit for the time away
    assert c.counter("light") == 100
    c.enter("new")  # a party above the floor keeps its own counter: what it used more stays on its account
    assert c.counter("new") == 230


def test_idle_parties_at_or_below_the_floor_are_forgotten_and_debts_are_kept():
    c = TokenCounters()
    c.enter("steady")
    c.enter("heavy")
    c.charge("heavy", decode=2500)  # 5000, while "steady" is still at 0
    c.exit("heavy")
    for i in range(SWEEP_EVERY * 2):  # many one-off parties come and go while "steady" keeps being served
        c.enter(f"one-off-{i}")
        c.charge(f"one-off-{i}", prefill=1)
        c.charge("steady", prefill=2)
        c.exit(f"one-off-{i}")
    assert len(c._served) <= 3  # noqa: SLF001 - the bound on memory is the point here
    assert c.counter("heavy") == 5000  # it used more than anyone since: that stays on its account


async def _holders(gate: FairGate, bucket: str, n: int) -> None:
    for _ in range(n):
        await gate.acquire(bucket)


def test_the_gate_serves_the_party_that_used_least_ahead_of_a_flooders_queue():
    async def scenario() -> list[str]:
        gate = FairGate(capacity=2, max_waiting=8)
        await _holders(gate, "flood", 2)
        gate.counters.charge("flood", prefill=40, decode=10)  # what its two answers used so far
        order: list[str] = []

        async def wait(bucket: str) -> None:
            await gate.acquire(bucket)
            order.append(bucket)

        tasks = [asyncio.create_task(wait("flood")) for _ in range(4)]
        await asyncio.sleep(0.01)
        tasks.append(asyncio.create_task(wait("quiet")))  # arrives last, lifted to the flooder's counter (60)
        await asyncio.sleep(0.01)
        assert gate.counters.counter("quiet") == 60
        gate.counters.charge("flood", decode=1)  # the flooder's answers keep decoding while the quiet party waits
        gate.release("flood")
        await asyncio.sleep(0.01)
        assert order == ["quiet"]
        for _ in range(5):
            gate.release(order[-1])
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        gate.release("flood")
        assert (gate.in_use(), gate.waiting()) == (0, 0)
        assert gate.counters.present() == {}
        return order

    assert asyncio.run(scenario()) == ["quiet", "flood", "flood", "flood", "flood"]


def test_two_backlogged_parties_share_the_slots_by_tokens_and_neither_starves():
    """A party asking for long answers and one asking for short ones, both always waiting: the slot goes to the
    lower counter, so each gets about half of the tokens, and the long-answer party is never shut out."""

    async def scenario() -> dict[str, list[int]]:
        gate = FairGate(capacity=1, max_waiting=4)
        cost = {"long": 40, "short": 5}
        served: dict[str, list[int]] = {"long": [], "short": []}
        await gate.acquire("long")
        holder = "long"
        waiting = {"short": asyncio.create_task(gate.acquire("short"))}
        for turn in range(60):
            gate.counters.charge(holder, decode=cost[holder])  # the holder's answer runs to its end
            served[holder].append(turn)
            waiting[holder] = asyncio.create_task(gate.acquire(holder))  # its next request, sent meanwhile
            await asyncio.sleep(0)
            gate.release(holder)
            for _ in range(5):
                await asyncio.sleep(0)
            (holder,) = [b for b, t in waiting.items() if t.done()]
        gate.release(holder)
        for t in waiting.values():
            t.cancel()
        await asyncio.gather(*waiting.values(), return_exceptions=True)
        assert (gate.in_use(), gate.waiting()) == (0, 0)
        return served

    served = asyncio.run(scenario())
    tokens = {b: len(turns) * n for b, turns, n in [("long", served["long"], 40), ("short", served["short"], 5)]}
    assert abs(tokens["long"] - tokens["short"]) <= 40 * 2  # within one long answer of an even split
    gaps = [b - a for a, b in zip(served["long"], served["long"][1:], strict=False)]
    assert max(gaps) <= 10  # the long-answer party waits at most ~8 short answers for its next turn


def test_a_cancelled_waiter_is_charged_nothing_and_leaves_no_trace():
    async def scenario() -> None:
        gate = FairGate(capacity=1, max_waiting=4)
        await gate.acquire("a")
        gate.counters.charge("a", decode=7)
        waiter = asyncio.create_task(gate.acquire("b"))
        await asyncio.sleep(0.01)
        lifted = gate.counters.counter("b")
        assert lifted == 14
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert gate.counters.counter("b") <= lifted  # nothing it did not use (forgotten at or below the floor)
        assert gate.counters.present() == {"a": 1}
        gate.release("a")
        assert (gate.in_use(), gate.waiting(), gate.counters.present()) == (0, 0, {})

    asyncio.run(scenario())


@pytest.mark.integration
def test_the_engine_serves_a_second_party_ahead_of_a_flooders_queue(model_backend):
    """Real llama.cpp, 4 slots: a flooder runs 4 answers of different lengths and queues 3 more; a second party
    arrives last. The first slot that frees goes to it, not to the flooder's older requests (first come, first
    served would make it wait for all three)."""
    backend = model_backend
    assert backend.max_concurrency == 4 and backend.max_queue >= 4
    greedy = [{"role": "user", "content": "Tell me a long story about a dragon."}]
    flood, quiet = "flood-vtc-test", "quiet-vtc-test"

    async def run() -> list[str]:
        firsts: list[str] = []

        async def answer(tag: str, party: str, n: int) -> None:
            agen = backend.stream(greedy, Sampling(temperature=0.0, max_new_tokens=n), party=party)
            try:
                first = await agen.__anext__()
                firsts.append(tag)
                assert first is not None
                async for _ in agen:
                    pass
            finally:
                await agen.aclose()

        running = [asyncio.create_task(answer(f"run{i}", flood, 16 * (i + 1))) for i in range(4)]
        while len(firsts) < 4:
            await asyncio.sleep(0.005)
        queued = [asyncio.create_task(answer(f"queued{i}", flood, 4)) for i in range(3)]
        await asyncio.sleep(0.05)
        assert len(firsts) == 4, "the flooder's queued requests must still be waiting for a slot"
        queued.append(asyncio.create_task(answer("quiet", quiet, 4)))
        await asyncio.gather(*running, *queued)
        return firsts[4:]

    order = asyncio.run(run())
    assert order[0] == "quiet", f"first answers after the flood's own: {order}"
