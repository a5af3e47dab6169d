"""Recognising image formats from their first bytes (never trusting a name or a header)."""

from __future__ import annotations

# The formats fal's Kontext endpoints read as input; the outputs are PNG or JPEG.
ACCEPTED_CONTENT_TYPES = frozenset({"image/png", "image/jpeg", "image/webp", "image/gif"})

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}

_EXTENSION_TYPES = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
}

SNIFF_BYTES = 12


def sniff_image_type(head: bytes) -> str | None:
    """The content type announced by the magic number at the start of `head`, if any."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return None


def declared_image_type(content_type: str | None, filename: str) -> str | None:
    """The image type an upload claims, from its content type or else its file extension.

    Used to refuse an unsuitable attachment before anything is spent; fal reads the bytes.
    """
    if content_type:
        base = content_type.split(";", 1)[0].strip().lower()
        return base if base in ACCEPTED_CONTENT_TYPES else None
    extension = filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
    return _EXTENSION_TYPES.get(extension)
