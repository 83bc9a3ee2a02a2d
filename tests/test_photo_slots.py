"""The photo slots: the server's limit, each caller's share, and a slot held for as long as
its decoded photo is (a real FaceEmbedder with the packaged model)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from photos import YAOMING

from dedup.core.errors import DeadlineExceeded, Stopping
from dedup.face.embedder import FaceEmbedder
from dedup.face.model_pack import resolve_model_dir
from dedup.face.photo_slots import PhotoSlots, SlotRefused


def refusal(slots: PhotoSlots, holder: str | None) -> SlotRefused:
    with pytest.raises(SlotRefused) as refused:
        slots.take(holder, "face.image")
    return refused.value


def test_a_caller_at_its_share_is_refused_while_others_are_served() -> None:
    slots = PhotoSlots(4, per_holder=2)
    slots.take("desk-a", "face.image")
    slots.take("desk-a", "face.image")
    refused = refusal(slots, "desk-a")
    assert refused.reason == "caller_limit"
    assert str(refused) == ("face.image: desk-a has 2 photos being embedded, its limit "
                            "(max_pending_images_per_caller); retry when one is done")
    slots.take("desk-b", "face.image")
    slots.take("desk-c", "face.image")
    full = refusal(slots, "desk-d")  # the server's 4 taken, desk-d's share untouched
    assert full.reason == "server_limit"
    assert "4 photos are already being embedded" in str(full)
    slots.give_back("desk-a")
    slots.take("desk-d", "face.image")
    assert (slots.taken, slots.held_by("desk-a"), slots.held_by("desk-d")) == (4, 1, 1)


def test_without_a_share_only_the_servers_limit_counts() -> None:
    slots = PhotoSlots(2)
    slots.take("desk-a", "face.image")
    slots.take("desk-a", "face.image")
    assert refusal(slots, "desk-a").reason == "server_limit"
    slots.give_back("desk-a")
    assert slots.taken == 1


def test_a_slot_given_back_twice_is_an_error_that_changes_nothing() -> None:
    slots = PhotoSlots(4, per_holder=2)
    slots.take("desk-a", "face.image")
    with pytest.raises(RuntimeError, match="'desk-b' gives back a slot it has not"):
        slots.give_back("desk-b")
    slots.give_back("desk-a")
    with pytest.raises(RuntimeError):
        slots.give_back("desk-a")
    assert (slots.taken, slots.held_by("desk-a")) == (0, 0)


@pytest.mark.parametrize("share", [0, 5])
def test_a_share_must_be_within_the_servers_slots(share: int) -> None:
    with pytest.raises(ValueError, match="max-pending-images-per-caller must be 1 to the "
                                         "server's 4 photo slots"):
        PhotoSlots(4, per_holder=share)


@pytest.fixture
def stalled() -> Iterator[FaceEmbedder]:
    """A real embedder whose one worker has stopped: a queued photo waits."""
    embedder = FaceEmbedder(resolve_model_dir(None), workers=1, max_pending=4,
                            max_pending_per_holder=1)
    embedder._queue.put(None)
    embedder._workers[0].join(timeout=10)
    assert not embedder._workers[0].is_alive()
    yield embedder
    embedder.close()


def test_a_photo_past_its_deadline_holds_its_slot_until_a_worker_drops_it(
        stalled: FaceEmbedder) -> None:
    """A photo whose caller's deadline passed gave its slot back at once, while its decoded
    pixels (up to 75 MB) stayed queued: a caller with short deadlines could queue any number
    of decoded photos past its share and the server's limit."""
    with pytest.raises(DeadlineExceeded):
        stalled.embed(YAOMING.read_bytes(), False, "face.image", timeout=0.2, holder="desk")
    assert (stalled.slots.taken, stalled.slots.held_by("desk")) == (1, 1)
    assert refusal(stalled.slots, "desk").reason == "caller_limit"
    stalled._queue.put(None)
    stalled._work(None)  # a worker takes the abandoned photo, drops it, then stops
    assert stalled.slots.taken == 0


def test_photos_queued_when_the_embedder_closes_are_answered_stopping(
        stalled: FaceEmbedder) -> None:
    """A photo queued behind close()'s stop signals was never answered: without a deadline
    its caller waited for ever (and held up the process's exit), with one it kept its slot;
    a photo sent after close() was queued the same way."""
    answers: list[BaseException] = []

    def wait_for_photo() -> None:
        try:
            stalled.embed(YAOMING.read_bytes(), False, "face.image", holder="desk")
        except Stopping as error:
            answers.append(error)

    caller = threading.Thread(target=wait_for_photo)
    caller.start()
    deadline = time.monotonic() + 30
    while stalled._queue.qsize() < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    stalled.close()
    caller.join(timeout=10)
    assert not caller.is_alive()
    assert [str(a) for a in answers] == ["face.image: the server is stopping; retry"]
    with pytest.raises(Stopping):
        stalled.embed(YAOMING.read_bytes(), False, "face.image", holder="desk")
    assert stalled.slots.taken == 0
