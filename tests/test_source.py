import pytest

from preftune.data.source import OfflineSource


def make(n, micro, accum, world, rank, by_length=True, seed=3):
    examples = [{"id": i, "len": (i * 7) % 11} for i in range(n)]
    return OfflineSource(
        examples,
        lambda rows: [r["id"] for r in rows],
        micro_batch_size=micro,
        grad_accum_steps=accum,
        world_size=world,
        rank=rank,
        seed=seed,
        length_of=(lambda e: e["len"]) if by_length else None,
    )


def global_rows(n, micro, accum, world, steps, by_length=True):
    sources = [make(n, micro, accum, world, r, by_length) for r in range(world)]
    out = []
    for _ in range(steps):
        rows = []
        for s in sources:
            batches = s.next_step()
            assert len(batches) == accum and all(len(b) == micro for b in batches)
            rows += [i for b in batches for i in b]
        out.append(sorted(rows))
    return out


@pytest.mark.parametrize("by_length", [True, False])
def test_global_batch_is_the_same_set_however_split(by_length):
    ref = global_rows(40, 8, 1, 1, 12, by_length)
    for micro, accum, world in [(1, 8, 1), (4, 2, 1), (2, 2, 2), (1, 4, 2), (4, 1, 2)]:
        assert global_rows(40, micro, accum, world, 12, by_length) == ref


def test_epochs_cover_every_row_once_and_reshuffle():
    s = make(24, 4, 1, 1, 0)
    epoch0 = [i for _ in range(6) for b in s.next_step() for i in b]
    epoch1 = [i for _ in range(6) for b in s.next_step() for i in b]
    assert sorted(epoch0) == sorted(epoch1) == list(range(24))
    assert epoch0 != epoch1


def test_state_dict_resumes_the_same_sequence():
    a = make(30, 2, 2, 1, 0)
    for _ in range(9):
        a.next_step()
    b = make(30, 2, 2, 1, 0)
    b.load_state_dict(a.state_dict())
    assert [a.next_step() for _ in range(10)] == [b.next_step() for _ in range(10)]


def test_too_little_data_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one global batch of 8"):
        make(5, 4, 2, 1, 0)
