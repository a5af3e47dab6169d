"""Result images in the bot's custody, from fal's CDN until they are posted in Discord.

An image travels in memory while the bytes held for all jobs together stay within the budget
(`RESULT_MEMORY_BYTES`), and through a file in `DATA_DIR` beyond it: decided chunk by chunk as
it arrives, so it does not depend on fal announcing a size. A result whose first post fails is
moved to files, so a long Discord outage neither piles bytes up in memory nor depends on fal
still having them. Files are written whole or not at all and their paths are derived from the
job, never read from the database.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import aiohttp.payload
from aiohttp.abc import AbstractStreamWriter

from .fal_queue import DownloadSink
from .flux_kontext import KontextOutput
from .job import JobResult, ResultImage

log = logging.getLogger(__name__)


class ImageDownloader(Protocol):
    """Fetches a result image from fal's CDN (FalQueueClient.download)."""

    async def download(self, url: str, sink: DownloadSink, *, max_bytes: int, deadline: float) -> tuple[int, str]: ...


class ResultBuffer(io.BytesIO):
    """A result image held in memory on its way to Discord."""


class _WholeBufferPayload(aiohttp.payload.Payload):
    """Uploads a ResultBuffer in one write. aiohttp's BytesIO payload reads 64 KiB at a time with
    an event-loop turn between pieces, which costs a 1 MiB image more CPU than its bytes."""

    _value: ResultBuffer

    def __init__(self, value: ResultBuffer, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("content_type", "application/octet-stream")
        super().__init__(value, *args, **kwargs)

    @property
    def size(self) -> int:
        return self._value.getbuffer().nbytes - self._value.tell()

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: AbstractStreamWriter, content_length: int | None) -> None:
        start = self._value.tell()
        end = None if content_length is None else start + content_length
        with self._value.getbuffer() as view:
            await writer.write(view[start:end])  # the transport copies what it cannot send at once

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self._value.getvalue().decode(encoding, errors)

    async def as_bytes(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self._value.getvalue()


aiohttp.payload.PAYLOAD_REGISTRY.register(_WholeBufferPayload, ResultBuffer, order=aiohttp.payload.Order.try_first)


class ResultsLost(Exception):
    """A result's images are neither at hand nor available from fal any more."""


class _MemoryBudget:
    """Bytes held in memory at once by all jobs. `try_take` refuses rather than waits: an image
    over the budget goes through a file instead."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self.used = 0

    def try_take(self, amount: int) -> bool:
        if self.used + amount > self._limit:
            return False
        self.used += amount
        return True

    def give_back(self, amount: int) -> None:
        self.used -= amount
        assert self.used >= 0, "gave back more than was taken"


class _Spool:
    """Receives one downloading image: into memory while the budget allows (the pieces as they
    arrive, joined once at the end: one copy of the image, not one per piece), then (moving what
    arrived so far) into a partial file that becomes `path` only once the image is whole."""

    def __init__(self, budget: _MemoryBudget, path: Path) -> None:
        self._budget = budget
        self._path = path
        self._partial = path.with_name(path.name + ".part")
        self._pieces: list[bytes] | None = []
        self._held = 0
        self._file: BinaryIO | None = None

    def write(self, chunk: bytes) -> None:
        if self._pieces is not None:
            if self._budget.try_take(len(chunk)):
                self._pieces.append(chunk)
                self._held += len(chunk)
                return
            self._spill()
        assert self._file is not None
        self._file.write(chunk)

    def _spill(self) -> None:
        assert self._pieces is not None
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._partial, "wb")  # noqa: SIM115 - closed by finish() or discard()
        self._file.writelines(self._pieces)
        self._release_pieces()

    def _release_pieces(self) -> None:
        self._budget.give_back(self._held)
        self._pieces, self._held = None, 0

    def discard(self) -> None:
        """Forget what arrived (the download failed, or restarts from the beginning)."""
        if self._pieces is not None:
            self._release_pieces()
        if self._file is not None:
            self._file.close()
            self._file = None
            self._partial.unlink(missing_ok=True)
        self._pieces = []

    def finish(self, image: ResultImage) -> None:
        """Hand the whole image over to `image`: its buffer, or its file in DATA_DIR."""
        if self._pieces is not None:
            image.data = ResultBuffer(b"".join(self._pieces))  # shares the joined bytes, no copy
            self._pieces = None  # the budget stays taken until the custody releases the image
            return
        assert self._file is not None
        _durable_close(self._file)
        self._file = None
        os.replace(self._partial, self._path)
        _sync_directory(self._path.parent)
        image.path = self._path


class ResultCustody:
    def __init__(self, fal: ImageDownloader, results_dir: Path, *, memory_bytes: int, max_image_bytes: int) -> None:
        self._fal = fal
        self._dir = results_dir
        self._memory = _MemoryBudget(memory_bytes)
        self._max_image_bytes = max_image_bytes

    @property
    def bytes_in_memory(self) -> int:
        return self._memory.used

    def path(self, job_id: int, index: int) -> Path:
        return self._dir / f"job-{job_id}-{index + 1}"

    async def take(self, job_id: int, output: KontextOutput, *, deadline: float) -> JobResult:
        """Download every image of a finished job at once, for its post (fal's CDN keeps the
        files for days; `restore` fetches them again by the same addresses)."""
        result = JobResult(
            seed=output.seed,
            images=[ResultImage(0, "", image.nsfw, image.width, image.height, image.url) for image in output.images],
            inference_seconds=output.inference_seconds,
        )
        await self._fetch(job_id, list(enumerate(result.images)), deadline)
        return result

    async def restore(self, job_id: int, result: JobResult, *, deadline: float) -> None:
        """After a restart: find each image's file, or fetch the image again from fal's CDN.
        Raises ResultsLost, or FalResultExpired when fal no longer has it."""
        missing = []
        for index, image in enumerate(result.images):
            if image.data is not None or image.path is not None:
                continue
            path = self.path(job_id, index)
            if image.on_disk and path.exists():
                image.path = path
            elif image.url:
                missing.append((index, image))
            else:
                raise ResultsLost(f"result image {index + 1} is gone and has no URL")
        if missing:
            log.info("job %d: fetching %d result image(s) again from fal", job_id, len(missing))
            await self._fetch(job_id, missing, deadline)

    async def _fetch(self, job_id: int, images: list[tuple[int, ResultImage]], deadline: float) -> None:
        try:
            async with asyncio.TaskGroup() as downloads:
                for index, image in images:
                    downloads.create_task(self._fetch_one(self.path(job_id, index), image, deadline))
        except BaseExceptionGroup as group:
            for _, image in images:
                self.release(image)
                if image.path is not None:
                    image.path.unlink(missing_ok=True)
                    image.path, image.on_disk = None, False
            raise group.exceptions[0] from None

    async def _fetch_one(self, path: Path, image: ResultImage, deadline: float) -> None:
        spool = _Spool(self._memory, path)
        try:
            image.size, image.content_type = await self._fal.download(
                image.url or "", spool, max_bytes=self._max_image_bytes, deadline=deadline
            )
        except BaseException:
            spool.discard()
            raise
        spool.finish(image)
        image.on_disk = image.path is not None

    async def keep_on_disk(self, job_id: int, result: JobResult) -> bool:
        """Move the images held in memory to files (a post failed: the delivery may take a
        while, or a restart). Returns whether anything moved, so the caller stores it."""
        moved = False
        for index, image in enumerate(result.images):
            if image.data is None:
                continue
            path = self.path(job_id, index)
            await asyncio.to_thread(_write_whole, path, image.data.getvalue())
            self.release(image)
            image.path, image.on_disk = path, True
            moved = True
        return moved

    def release(self, image: ResultImage) -> None:
        """Free an image's bytes held in memory (at once, not when the garbage collector gets to
        aiohttp's request objects that still point at the buffer)."""
        if image.data is not None:
            self._memory.give_back(image.size)
            image.data.close()
            image.data = None

    def sweep(self, *, keep: set[int]) -> None:
        """At start: delete what no unfinished job needs (files of jobs delivered just before a
        crash, partial files a crash left)."""
        if not self._dir.exists():
            return
        for path in self._dir.iterdir():
            job_id = path.name.split("-")[1] if path.name.startswith("job-") else ""
            if path.suffix == ".part" or not job_id.isdigit() or int(job_id) not in keep:
                path.unlink(missing_ok=True)

    def discard(self, job_id: int, result: JobResult | None) -> None:
        """The result is posted (or will never be): free its memory and delete its files."""
        for index, image in enumerate(result.images if result else ()):
            self.release(image)
            self.path(job_id, index).unlink(missing_ok=True)
            image.path = None


def _write_whole(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all, and durably: a crash leaves no half image behind, and
    a power loss no recorded path to an empty file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    with open(partial, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)
    _sync_directory(path.parent)


def _durable_close(file: BinaryIO) -> None:
    file.flush()
    os.fsync(file.fileno())
    file.close()


def _sync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
