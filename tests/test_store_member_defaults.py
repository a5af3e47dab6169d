"""A member's defaults and a shared result in the store, on both engines."""

from __future__ import annotations

from services.job import NOTE_SHARED_AS
from services.member_defaults import MemberDefaults
from tests.test_store import NOW, Opener, new_store, request

__all__ = ["new_store"]  # the engine-parametrised fixture, used by name

SNOWFLAKE = 1 << 60  # Discord ids need 64 bits


async def test_member_defaults_are_kept_per_member_across_restarts(new_store: Opener):
    mine = MemberDefaults(aspect_ratio="16:9", num_images=2, safety_tolerance=5, private_first=True)
    async with new_store() as store:
        assert await store.member_defaults(SNOWFLAKE) == MemberDefaults()
        await store.save_member_defaults(SNOWFLAKE, mine, now=NOW)
        await store.save_member_defaults(7, MemberDefaults(output_format="png"), now=NOW)
    async with new_store() as store:
        assert await store.member_defaults(SNOWFLAKE) == mine
        assert await store.member_defaults(7) == MemberDefaults(output_format="png")
        changed = MemberDefaults(enhance_prompt=True)
        await store.save_member_defaults(SNOWFLAKE, changed, now=NOW + 1)
        assert await store.member_defaults(SNOWFLAKE) == changed


async def test_no_defaults_leave_no_row(new_store: Opener):
    async with new_store() as store:
        await store.save_member_defaults(7, MemberDefaults(num_images=3), now=NOW)
        await store.save_member_defaults(7, MemberDefaults(), now=NOW)
        rows = await store._fetch("SELECT COUNT(*) FROM member_defaults", {})
        assert rows[0][0] == 0
        assert await store.member_defaults(7) == MemberDefaults()


async def test_a_share_adds_its_message_to_a_finished_job(new_store: Opener):
    async with new_store() as store:
        job = await store.create_job(request())
        job.posted_message_ids = [11]
        job.delivered_at = NOW
        await store.save(job)
        await store.record_share(job, SNOWFLAKE, part=11)
    async with new_store() as store:
        loaded = await store.get_job(job.id)
        assert loaded is not None
        assert loaded.posted_message_ids == [11, SNOWFLAKE]
        assert loaded.notes[NOTE_SHARED_AS] == SNOWFLAKE and loaded.shared_as(11) == SNOWFLAKE
