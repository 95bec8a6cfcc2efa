"""The local engine (``core.engine``): parts in this process or in a pool of processes, read
from their iterator only as room frees up, results in order when asked, progress counted once."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vsotools.core.config import EngineConfig
from vsotools.core.engine import EngineError, Task, open_engine


def square(offset: int, n: int, report) -> int:
    report(n)
    return offset + n * n


def fail_on_three(n: int, report) -> int:
    if n == 3:
        raise ValueError("three")
    return n


@pytest.mark.parametrize("workers", [1, 2])
def test_parts_are_taken_as_room_frees_up_not_all_at_once(workers):
    """Bug: the local engine listed every task before starting, so each part's input (a batch of
    records, a slice of the table) sat in memory at once: the filter's peak went from 505 MB to
    912 MB on a million records."""
    taken: list[int] = []

    def tasks() -> Iterator[Task]:
        for n in range(40):
            taken.append(n)
            yield Task(f"part {n}", (n,), size=n)

    progress: list[int] = []
    with open_engine(EngineConfig()) as engine:
        results = engine.map(
            square, tasks(), shared=(1000,), workers=workers, progress=progress.append,
            ordered=True,
        )  # fmt: skip
        first_task, first = next(results)
        assert first_task.key == "part 0" and first == 1000
        assert len(taken) <= 2 * workers + 2, taken
        rest = list(results)
    assert [r for _, r in rest] == [1000 + n * n for n in range(1, 40)]
    assert sum(progress) == sum(range(40))


def test_a_part_that_fails_stops_the_map_with_its_error():
    with open_engine(EngineConfig()) as engine:
        tasks = [Task(str(n), (n,)) for n in range(6)]
        with pytest.raises(ValueError, match="three"):
            list(engine.map(fail_on_three, tasks, workers=2))


def test_a_ray_engine_without_a_reachable_cluster_is_one_line():
    pytest.importorskip("ray")
    with pytest.raises(EngineError, match=r"cannot reach a Ray cluster at 127\.0\.0\.1:9"):
        open_engine(EngineConfig(kind="ray", ray_address="127.0.0.1:9"))


def slow_first(n: int, report) -> int:
    import time

    time.sleep(1.0 if n == 0 else 0.01)
    return n


@pytest.mark.parametrize("workers", [1, 2])
def test_results_keep_coming_while_the_next_part_is_not_ready(workers):
    """Bug: the engine asked its task iterator for the next part inside its wait loop; a crawl,
    whose parts come as fast as the search finds photos, held every finished part unrecorded
    until the next part existed."""
    from vsotools.core.engine import NOT_YET

    seen: list[int] = []

    def tasks():
        for n in range(3):
            yield Task(f"part {n}", (n,))
            while len(seen) <= n:  # the next part exists only once this one is recorded
                yield NOT_YET

    with open_engine(EngineConfig()) as engine:
        for _task, result in engine.map(square, tasks(), shared=(0,), workers=workers):
            seen.append(result)
    assert sorted(seen) == [0, 1, 4]


def test_an_ordered_map_takes_no_more_parts_while_a_slow_first_one_holds_the_rest_back():
    taken: list[int] = []

    def tasks():
        for n in range(200):
            taken.append(n)
            yield Task(f"part {n}", (n,))

    with open_engine(EngineConfig()) as engine:
        results = engine.map(slow_first, tasks(), workers=2, ordered=True)
        _, first = next(results)
        assert first == 0
        assert len(taken) <= 2 * 2 + 2, len(taken)
        assert [r for _, r in results] == list(range(1, 200))


def test_ray_address_from_the_environment_is_probed_and_refused_in_one_line(monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    with pytest.raises(EngineError, match=r"cannot reach a Ray cluster at 127\.0\.0\.1:9"):
        open_engine(EngineConfig(kind="ray", ray_address=""))
