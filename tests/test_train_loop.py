"""The learner's step plan: every sample once per epoch, steps of micro x accum, short with short."""

from replay.learn.loop import plan_steps


def test_each_epoch_takes_every_sample_once_in_steps_of_micro_times_accum():
    indices = list(range(3, 40))
    lengths = {i: (i * 37) % 101 for i in indices}
    steps = plan_steps(indices, lengths, micro=4, accum=2, seed=5, epochs=2)
    for epoch in (0, 1):
        mine = [mbs for e, mbs in steps if e == epoch]
        assert sorted(i for mbs in mine for mb in mbs for i in mb) == indices
        assert [sum(map(len, mbs)) for mbs in mine] == [8, 8, 8, 8, 5]  # 37 samples
        assert all(len(mb) == 4 for mbs in mine for mb in mbs[:-1])


def test_micro_batches_of_a_step_are_sorted_by_length_and_the_plan_is_seeded():
    indices = list(range(64))
    lengths = [(i * 53) % 97 for i in indices]
    steps = plan_steps(indices, lengths, micro=4, accum=4, seed=0, epochs=1)
    for _, micro_batches in steps:
        flat = [lengths[i] for mb in micro_batches for i in mb]
        assert flat == sorted(flat)
    assert steps == plan_steps(indices, lengths, micro=4, accum=4, seed=0, epochs=1)
    assert steps != plan_steps(indices, lengths, micro=4, accum=4, seed=1, epochs=1)
    # the sort stays inside a step: which samples share a step is the shuffle's choice alone
    other = plan_steps(indices, [0] * 64, micro=4, accum=4, seed=0, epochs=1)
    assert [sorted(i for mb in s for i in mb) for _, s in steps] == \
           [sorted(i for mb in s for i in mb) for _, s in other]
