"""Limits on what a person may send: bounds that the bots check early and the services enforce again."""

from __future__ import annotations

from pydantic import BaseModel, Field

MiB = 1024 * 1024
DISCORD_HOSTS = ("cdn.discordapp.com", "media.discordapp.net")
SLACK_HOSTS = ("files.slack.com",)


class IngestLimits(BaseModel):
    """What a `/skill-train` may send. `allowed_hosts`, `require_https` and `allow_private_addresses` are loosened
    only by tests, which serve images from a local server."""

    max_images: int = Field(50, ge=1, le=200)
    max_file_bytes: int = Field(10 * MiB, gt=0)
    max_total_bytes: int = Field(100 * MiB, gt=0)
    max_pixels: int = Field(4096 * 4096, gt=0, description="width x height, checked before decoding")
    max_aspect_ratio: float = Field(4.0, ge=1.0, description="long side / short side, checked before decoding")
    max_side_px: int = Field(1024, ge=64, description="every image is downscaled to this long side at ingest")
    max_zip_members: int = Field(200, ge=1)
    max_zip_total_bytes: int = Field(200 * MiB, gt=0, description="sum of the members' uncompressed sizes")
    max_zip_ratio: float = Field(50.0, gt=1.0, description="uncompressed / compressed size of any one member")
    max_redirects: int = Field(3, ge=0, le=10)
    timeout_s: float = Field(30.0, gt=0)
    allowed_hosts: tuple[str, ...] = Field(DISCORD_HOSTS + SLACK_HOSTS, description="host, or host:port")
    # Read when the limits are made (not at import), so a test that swaps SLACK_HOSTS sees its own.
    slack_file_hosts: tuple[str, ...] = Field(
        default_factory=lambda: SLACK_HOSTS,
        description="where the Slack bot token is sent: host (any port) or host:port; only ever to an allowed host",
    )
    require_https: bool = True
    allow_private_addresses: bool = False
