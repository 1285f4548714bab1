from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from captionbus.contracts.ids import Token


class ArtifactRef(BaseModel):
    """A file produced or consumed by a stage, addressed by its content.

    `key` is the sha256 hex digest of the bytes: it names the object in the object store
    and the file under a host's local artifact root, and gives the stage cache for free.
    `name` is a display/file name only (never a path); readers must not trust it as one.
    """

    model_config = ConfigDict(frozen=True)

    key: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the content")
    name: str = Field(
        pattern=r"^[^/\\\x00]{1,200}$",
        description="file name for humans and for the extension; never a path",
    )
    size: int = Field(ge=0)
    media_type: str | None = None
    # Where the bytes can be found. A reader on the same host may use the local
    # root directly; everyone else fetches from the object store.
    origin_host: Token | None = None
    in_object_store: bool = False
