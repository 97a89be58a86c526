"""Claim states and their transitions, each recorded as an event with a reason.

    accepted -> fulfilling -> fulfilled
    accepted | fulfilling -> failed -> refunded
    failed -> accepted (ops retry)
    failed -> fulfilled (the partner reports success before the claim was refunded)

The transitions themselves are guarded UPDATEs (``store.claim_states``): the row must still
be in an expected state, so two workers, a late partner callback and an operator can never
move a claim twice.
"""

from __future__ import annotations

ACCEPTED = "accepted"
FULFILLING = "fulfilling"
FULFILLED = "fulfilled"
FAILED = "failed"
REFUNDED = "refunded"
OPEN_STATES = (ACCEPTED, FULFILLING)

ALLOWED = {  # (from, to)
    (ACCEPTED, FULFILLING),
    (ACCEPTED, FULFILLED),
    (ACCEPTED, FAILED),
    (FULFILLING, FULFILLED),
    (FULFILLING, FAILED),
    (FAILED, REFUNDED),
    (FAILED, ACCEPTED),
    (FAILED, FULFILLED),
}
