"""Sharded stock: a hot benefit's period stock split into buckets on several Redis slots.

A benefit may declare ``"shards": K`` (2..``MAX_SHARDS``). Each period's stock is then split
over K buckets (``share``), each in a hash slot of its own, so on a Redis Cluster the claims
of one benefit are decided by several primaries. A member always goes to the same bucket
(``bucket_of``, a stable hash of the member id), where their quota and idempotency keys live.
A bucket that runs dry borrows from the others in bounded steps (``claims.shards``), and a
member is told ``sold_out`` only once every bucket is empty and no units are on their way
between two buckets.

Sharding is for plain unit stock: direct-charge options without a per-option cap, no draw,
no points price, no waiting room (each of those counts something per benefit that the
buckets would have to share too). K cannot change once the benefit exists: members would
change buckets mid-period and lose their quota and idempotency keys.
"""

from __future__ import annotations

import hashlib
from typing import Any

from claim_service.domain.fields import ConflictingFields, as_integer
from claim_service.errors import ValidationError

MAX_SHARDS = 64


def bucket_of(user_id: str, shards: int) -> int:
    """The bucket (0..shards-1) deciding ``user_id``'s claims; the same in every process."""
    if shards <= 1:
        return 0
    digest = hashlib.blake2b(user_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def share(total: int, shards: int, bucket: int) -> int:
    """Bucket ``bucket``'s part of ``total`` units: the parts differ by at most one, sum to
    ``total``, and each never shrinks as ``total`` grows (top-ups are split the same way)."""
    whole, rest = divmod(total, shards)
    return whole + (1 if bucket < rest else 0)


def parse_shards(data: dict[str, Any], *, unsupported: dict[str, bool]) -> int:
    """``data["shards"]`` (1 when absent). ``unsupported`` names each feature the benefit
    uses that sharded stock cannot share between buckets (``{"draw": True, ...}``)."""
    raw = data.get("shards")
    if raw is None:
        return 1
    value = as_integer(raw)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SHARDS:
        raise ValidationError(f"shards must be an integer in 1..{MAX_SHARDS}", field="shards")
    if value > 1:
        for feature, used in unsupported.items():
            if used:
                raise ConflictingFields(
                    f"a sharded benefit cannot have {feature} (its count is kept per benefit)",
                    field="shards",
                )
    return value
