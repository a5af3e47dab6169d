"""A member's own defaults for `/kontext` (`/kontext-settings`): the options used when the
command leaves them out, and whether results come to them privately first. Pure: the store keeps
them, the cogs ask and show them.

They belong to the member, not to a server: their taste in shape and format follows them to every
server and DM, and each place's policy still caps the safety tolerance at use."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .flux_kontext import KontextOptions

# The options a member may keep a default for, in the order they are shown.
DEFAULTABLE = ("aspect_ratio", "num_images", "output_format", "safety_tolerance", "enhance_prompt")
_TYPES: dict[str, type] = {
    "aspect_ratio": str,
    "num_images": int,
    "output_format": str,
    "safety_tolerance": int,
    "enhance_prompt": bool,
}


@dataclass(frozen=True)
class MemberDefaults:
    aspect_ratio: str | None = None
    num_images: int | None = None
    output_format: str | None = None
    safety_tolerance: int | None = None
    enhance_prompt: bool | None = None
    # Results shown to the member alone first, with a "Share to channel" button.
    private_first: bool = False

    @property
    def options(self) -> KontextOptions:
        """The defaults as model options (checked like the command's: InvalidEdit)."""
        return KontextOptions(**{name: getattr(self, name) for name in DEFAULTABLE})

    @property
    def is_empty(self) -> bool:
        return self == MemberDefaults()

    def apply(self, options: KontextOptions) -> tuple[KontextOptions, tuple[str, ...]]:
        """`options` with every option the member left out filled from these defaults, and the
        names of those filled: what the member set explicitly always wins."""
        filled = {
            name: getattr(self, name)
            for name in DEFAULTABLE
            if getattr(options, name) is None and getattr(self, name) is not None
        }
        return dataclasses.replace(options, **filled), tuple(filled)

    def to_dict(self) -> dict[str, Any]:
        """The stored form: only what is set (a default "off" is kept: it is a choice)."""
        stored = {name: getattr(self, name) for name in DEFAULTABLE if getattr(self, name) is not None}
        return {**stored, "private_first": True} if self.private_first else stored

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MemberDefaults:
        """Tolerant of rows from other versions: unknown keys and values of the wrong type are
        dropped; a value the model no longer takes is dropped too, never sent."""
        values: dict[str, Any] = {}
        for name, kind in _TYPES.items():
            value = data.get(name)
            if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
                values[name] = value
        for name, value in list(values.items()):
            try:
                KontextOptions(**{name: value}).check()
            except ValueError:
                del values[name]
        return cls(**values, private_first=data.get("private_first") is True)
