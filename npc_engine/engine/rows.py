"""The greedy step's packed rows: every input of a temperature-0 step in one small int64 tensor (one copy to the
device, one CUDA-graph input), and its result in another. The one place their columns are named.

Input row: token before the last, last token, length, slot, drafts proposed (how many of the step's K drafts the
target verifies for this row), prefix slot, prefix length, then (host drafters) K drafts.
Result row: accepted drafts, the target's next token, the K drafts (a tree step: its accepted path; only the first
ACCEPTED columns count), then the first three input columns of the row's next step (token before the next, the next
token, the new length), so a pipelined step can start from it on the device.
"""
from typing import NamedTuple

# input columns
PREV_TOKEN, LAST_TOKEN, LENGTH, SLOT, PROPOSED, PREFIX_SLOT, PREFIX_LEN = range(7)
HOST_DRAFTS = 7  # first host draft column
PREFIX = slice(PREFIX_SLOT, PREFIX_LEN + 1)
CARRIED = slice(PREV_TOKEN, LENGTH + 1)  # what a step's result hands its successor
# result columns
ACCEPTED, NEXT_TOKEN, FIRST_DRAFT = range(3)


def batch_bucket(batch: int) -> int:
    """Batches are padded (under graphs) and timed per power of two: step times differ with the batch, not within a
    bucket."""
    return 1 << max(0, batch - 1).bit_length()


def drafts(k: int) -> slice:
    """The result's draft columns."""
    return slice(FIRST_DRAFT, FIRST_DRAFT + k)


def carried(k: int) -> slice:
    """The result's columns that become the next step's CARRIED input columns."""
    return slice(FIRST_DRAFT + k, FIRST_DRAFT + k + 3)


class StepResult(NamedTuple):
    """One row's outcome of a speculative step (greedy or sampled)."""
    accepted: int  # drafts accepted
    next_token: int  # the target's token after them
    proposed: int  # drafts the target verified for this row
    drafts: list[int]


def pack(ids: list[int], slot: int, proposed: int, prefix: list[int], host_drafts: list[int], width: int) -> list[int]:
    """One request's input row (host drafts padded to width)."""
    return [ids[-2] if len(ids) > 1 else ids[-1], ids[-1], len(ids), slot, proposed, *prefix,
            *host_drafts, *[0] * (width - len(host_drafts))]


def padding(scratch_slot: int, width: int) -> list[int]:
    """A row that pads a batch to its graph's size: it writes only the scratch slot and proposes nothing."""
    return pack([0, 0], scratch_slot, 0, [0, 0], [], width)


def unpack(result: list[int], row: list[int], k: int) -> StepResult:
    """A result row (host list) and the input row it was launched from."""
    return StepResult(result[ACCEPTED], result[NEXT_TOKEN], row[PROPOSED], result[drafts(k)])
