import asyncio

from services.slots import SlotQueue


async def test_waiters_are_served_in_order_and_see_their_place():
    seen: list[dict[int, int]] = []
    slots = SlotQueue(1, seen.append)
    await slots.acquire(1)
    order: list[int] = []

    async def job(job_id: int) -> None:
        await slots.acquire(job_id)
        order.append(job_id)

    waiting = [asyncio.create_task(job(i)) for i in (2, 3, 4)]
    await asyncio.sleep(0)
    assert slots.positions() == {2: 1, 3: 2, 4: 3}
    for _ in range(3):
        slots.release()
        await asyncio.sleep(0)
    await asyncio.gather(*waiting)
    assert order == [2, 3, 4]
    assert seen[-1] == {}
    assert slots.in_use == 1


async def test_a_withdrawn_waiter_leaves_the_line_and_others_move_up():
    seen: list[dict[int, int]] = []
    slots = SlotQueue(1, seen.append)
    await slots.acquire(1)
    second = asyncio.create_task(slots.acquire(2))
    third = asyncio.create_task(slots.acquire(3))
    await asyncio.sleep(0)
    second.cancel()
    await asyncio.sleep(0)
    assert slots.positions() == {3: 1}
    slots.release()
    await third
    assert slots.in_use == 1


async def test_take_occupies_a_slot_without_waiting():
    slots = SlotQueue(1, lambda _: None)
    slots.take()
    waiter = asyncio.create_task(slots.acquire(9))
    await asyncio.sleep(0)
    assert not waiter.done()
    slots.release()
    await waiter
