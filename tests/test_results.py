"""Result custody: memory while the budget allows (decided as bytes arrive, whatever fal
announces), files beyond it, whole-or-nothing, found or fetched again after a restart."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services.fal_queue import DownloadSink, FalResultExpired
from services.flux_kontext import KontextOutput, OutputImage
from services.job import JobResult, ResultImage
from services.results import ResultCustody, ResultsLost

PNG = b"\x89PNG\r\n\x1a\n"


class FakeCdn:
    """Serves images in chunks, like FalQueueClient.download; can fail once midway."""

    def __init__(self, files: dict[str, bytes], chunk: int = 1000) -> None:
        self.files = files
        self.chunk = chunk
        self.fail_after_first_chunk: set[str] = set()
        self.downloads: list[str] = []

    async def download(self, url: str, sink: DownloadSink, *, max_bytes: int, deadline: float) -> tuple[int, str]:
        self.downloads.append(url)
        if url not in self.files:
            raise FalResultExpired("gone")
        data = self.files[url]
        for offset in range(0, len(data), self.chunk):
            sink.write(data[offset : offset + self.chunk])
            await asyncio.sleep(0)
            if url in self.fail_after_first_chunk:
                sink.discard()
                raise ConnectionError("cut short")
        return len(data), "image/png"


def output(*urls: str) -> KontextOutput:
    return KontextOutput(tuple(OutputImage(url, None, 64, 64, False) for url in urls), 1, None)


def custody(tmp_path: Path, cdn: FakeCdn, memory: int) -> ResultCustody:
    return ResultCustody(cdn, tmp_path / "results", memory_bytes=memory, max_image_bytes=10**7)


async def test_images_that_fit_the_budget_stay_in_memory(tmp_path):
    cdn = FakeCdn({"a": PNG + bytes(3000), "b": PNG + bytes(3000)})
    results = custody(tmp_path, cdn, memory=10_000)
    result = await results.take(1, output("a", "b"), deadline=0)
    assert all(image.data is not None and not image.on_disk for image in result.images)
    assert results.bytes_in_memory == 2 * 3008
    results.discard(1, result)
    assert results.bytes_in_memory == 0


async def test_an_image_over_the_budget_spills_to_a_file_as_it_arrives(tmp_path):
    big = PNG + bytes(20_000)
    cdn = FakeCdn({"a": big})
    results = custody(tmp_path, cdn, memory=5_000)
    (image,) = (await results.take(7, output("a"), deadline=0)).images
    assert image.data is None and image.on_disk and image.path == tmp_path / "results" / "job-7-1"
    assert image.path is not None and image.path.read_bytes() == big and image.size == len(big)
    assert results.bytes_in_memory == 0
    assert not list((tmp_path / "results").glob("*.part"))


async def test_a_zero_budget_always_goes_through_files(tmp_path):
    cdn = FakeCdn({"a": PNG + bytes(10)})
    results = custody(tmp_path, cdn, memory=0)
    (image,) = (await results.take(1, output("a"), deadline=0)).images
    assert image.on_disk and image.path is not None and image.path.exists()


async def test_a_failed_download_leaves_nothing_behind(tmp_path):
    cdn = FakeCdn({"a": PNG + bytes(50_000), "b": PNG + bytes(50_000)})
    cdn.fail_after_first_chunk.add("b")
    results = custody(tmp_path, cdn, memory=0)
    with pytest.raises(ConnectionError):
        await results.take(1, output("a", "b"), deadline=0)
    assert results.bytes_in_memory == 0
    assert list((tmp_path / "results").iterdir()) == []


async def test_moving_to_disk_after_a_failed_post_keeps_the_bytes(tmp_path):
    data = PNG + bytes(100)
    results = custody(tmp_path, FakeCdn({"a": data}), memory=10_000)
    result = await results.take(3, output("a"), deadline=0)
    assert await results.keep_on_disk(3, result)
    (image,) = result.images
    assert image.data is None and image.on_disk and image.path is not None and image.path.read_bytes() == data
    assert results.bytes_in_memory == 0
    assert not await results.keep_on_disk(3, result)  # nothing left in memory


async def test_after_a_restart_files_are_found_and_the_rest_fetched_again(tmp_path):
    cdn = FakeCdn({"a": PNG + bytes(10), "b": PNG + bytes(20)})
    results = custody(tmp_path, cdn, memory=0)
    first = await results.take(5, output("a"), deadline=0)
    stored = JobResult.from_dict(first.to_dict())  # as read from the database: no paths, no bytes
    stored.images.append(ResultImage(30, "image/png", False, url="b"))
    cdn.downloads.clear()
    await results.restore(5, stored, deadline=0)
    assert stored.images[0].path == tmp_path / "results" / "job-5-1"
    assert cdn.downloads == ["b"] and stored.images[1].available


async def test_a_stored_path_is_never_trusted(tmp_path):
    """Only the flag is stored; the file is always the job's own in DATA_DIR."""
    stored = JobResult.from_dict(
        {"seed": 1, "images": [{"path": ".env", "size": 1, "content_type": "x", "nsfw": False}]}
    )
    results = custody(tmp_path, FakeCdn({}), memory=0)
    with pytest.raises(ResultsLost):
        await results.restore(9, stored, deadline=0)
