"""A child run whose worker died stays RUNNING: the parent notices when nothing commits for `stuck_s`, at the first
look after it (it took twice `stuck_s`: the first look only recorded a count, from -1)."""

from flows.scale_out import StallWatch


def test_a_lost_child_is_noticed_at_the_first_look_after_stuck_s():
    watch, looks = StallWatch(stuck_s=900), []

    def count(value):
        def read():
            looks.append(value)
            return value
        return read

    watch.start(0, count=4, now=0.0)  # 4 (stage, shard) pairs were committed when the batch was submitted
    assert not watch.stalled(0, 899.0, count(4)) and looks == []  # storage is not read before stuck_s
    assert watch.stalled(0, 901.0, count(4))  # nothing committed since: lost at the first look, not at 1,800 s


def test_progress_restarts_the_clock_and_a_later_silence_is_noticed():
    watch = StallWatch(stuck_s=900)
    watch.start(0, count=0, now=0.0)
    assert not watch.stalled(0, 950.0, lambda: 2)  # it committed: alive, the clock restarts at 950
    assert watch.stalled_since(0) == 950.0
    assert not watch.stalled(0, 1800.0, lambda: 2)  # 850 s of silence: not yet
    assert watch.stalled(0, 1851.0, lambda: 2)
