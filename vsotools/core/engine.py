"""Mapping a per-part function over parts: on this machine, or as Ray tasks on a cluster.

Each data stage cuts its work into parts and has one pure, idempotent function of a part that
writes its outputs through temporary names and returns what the driver records: fetch's image
downloads (``fetch.parts.download_part``), filter's cleaning and word counting
(``dataset.filter.label_part``) and shard's writing (``shards.write.write_shard``). This module
is the one place that maps such a function over parts; no stage talks to Ray directly.

``open_engine(config)`` gives an ``Engine`` for the recipe's ``[engine]`` section:

- ``local``: the parts run in this process (``workers == 1``, or a single part), or in a pool
  of ``workers`` spawned processes that end with the command that started them
  (``processes.exit_with_parent``);
- ``ray``: each part is a Ray core task (one CPU each) on the cluster at ``ray_address``. Ray
  retries a task whose worker process or node died; a part's function is idempotent, so a
  retried part writes the same bytes. A bad address, a cluster that goes away (a head node that
  stops answering, watched from a helper thread), and a part that failed for good are one-line
  ``EngineError`` s.

``Engine.map(function, tasks)`` calls ``function(*shared, *task.args, report)`` for every task
and yields ``(task, result)`` as parts finish (or in task order with ``ordered``), keeping only
a few parts in flight per worker, and with ``ordered`` only as many finished ones waiting for an
earlier part, so that the driver's memory does not grow with the input. ``tasks`` is read as
room frees up; an iterator whose next part is not ready yet (a crawl gathering photos) yields
``NOT_YET``, and the engine goes on collecting results and asks again. ``report(n)``, called by
the function in its worker, moves the driver's progress by ``n`` units of the part (records,
images); the driver counts each part at most its ``size``, so a retried part is not counted
twice. ``shared`` arguments go to each worker once, not with every part.

``Engine.check_visible(paths)`` is the storage rule: every node must see the files the driver
sees (a folder every node mounts, or an object store URL); on a cluster it reads each path on
every node before any work and names the first node and path that differ.

Ray is imported only when the Ray engine is asked for (``pip install 'vsotools[ray]'``).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import logging
import multiprocessing
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from vsotools.core.config import EngineConfig
from vsotools.core.errors import VsoError
from vsotools.core.extras import first_line, require
from vsotools.core.processes import exit_with_parent

log = logging.getLogger(__name__)

RAY_INSTALL = "pip install 'vsotools[ray]'"
"""The command that installs Ray for the Ray engine."""

CONNECT_TIMEOUT = 60.0
"""Seconds to wait for a Ray cluster that accepts connections to answer ``ray.init``."""

RETRIES = 3
"""Times Ray runs a part again after its worker process or node died."""

GCS_RECONNECT_DEFAULT = 60.0
"""Seconds Ray's driver waits for a head node that stopped answering before it ends the
process (Ray's ``gcs_rpc_server_reconnect_timeout_s``, set with the environment variable
``RAY_gcs_rpc_server_reconnect_timeout_s``)."""

PROBE_PREFIX = ".vsotools-probe-"
"""Name prefix of the file a stage writes to its output storage for ``check_visible``."""

_IN_FLIGHT_PER_WORKER = 2
_REPORT_EVERY = 0.5
"""Seconds between a Ray task's progress reports (local workers report every few units)."""


class EngineError(VsoError):
    """The engine cannot run the parts: no Ray, no cluster, a part that failed for good."""


@dataclass(frozen=True)
class Task:
    """One part: ``key`` names it (progress, errors), ``args`` follow the shared arguments,
    ``size`` is how many units of progress it counts."""

    key: str
    args: tuple[Any, ...]
    size: int = 1


Report = Callable[[int], object]
Function = Callable[..., Any]

NOT_YET: Any = object()
"""What a task iterator yields when no part is ready yet: the engine asks again a moment later."""
_END = object()
_IDLE = 0.05
"""Seconds to wait before asking a task iterator again when no part is ready and none runs."""


class Engine:
    """Runs a per-part function over parts; see the module doc."""

    kind = "local"
    distributed = False
    """Whether parts may run on other machines (and storage must be visible to them)."""

    def __init__(self) -> None:
        self.nodes: collections.Counter[str] = collections.Counter()
        """Parts run on each node so far (by node id; ``local`` for this machine)."""

    def map(
        self,
        function: Function,
        tasks: Iterable[Task],
        *,
        shared: tuple[Any, ...] = (),
        workers: int = 1,
        progress: Report | None = None,
        ordered: bool = False,
    ) -> Iterator[tuple[Task, Any]]:
        """``(task, function(*shared, *task.args, report))`` for every task, as parts finish
        (in task order with ``ordered``). ``workers`` is the local engine's process count;
        ``progress(n)`` is called on the driver as parts progress."""
        tracker = _Tracker(progress)
        results = _Results(ordered)
        yield from self._run(function, iter(tasks), shared, workers, tracker, results)
        self._log_nodes()

    def check_visible(self, paths: Sequence[str]) -> None:
        """Refuse, naming the node and the path, a file some node cannot see as this process
        does (its size and first mebibyte); files this process cannot read are not compared."""

    def close(self) -> None:
        pass

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(
        self,
        function: Function,
        tasks: Iterator[Task],
        shared: tuple[Any, ...],
        workers: int,
        tracker: _Tracker,
        results: _Results,
    ) -> Iterator[tuple[Task, Any]]:
        raise NotImplementedError

    def _drive(
        self,
        feed: _Feed,
        pending: dict[Any, tuple[int, Task]],
        tracker: _Tracker,
        results: _Results,
        *,
        submit: Callable[[Task], Any],
        finished: Callable[[list[Any]], Iterable[Any]],
        collect: Callable[[Any, Task], tuple[Any, str]],
    ) -> Iterator[tuple[Task, Any]]:
        """The loop of a pool of workers: ``submit`` tasks while the feed has room, wait until
        some of the ``pending`` handles are ``finished``, ``collect`` each one's result and
        node, and hand the results on. ``pending`` is the caller's, to cancel on an error."""

        def fill() -> None:
            while (taken := feed.take(len(pending) + len(results.waiting))) is not None:
                index, task = taken
                tracker.start(task)
                pending[submit(task)] = (index, task)

        fill()
        while pending or not feed.exhausted:
            if not pending:
                time.sleep(_IDLE)
                fill()
                continue
            for handle in finished(list(pending)):
                index, task = pending.pop(handle)
                result, node = collect(handle, task)
                tracker.done(task.key)
                self.nodes[node] += 1
                yield from results.add(index, task, result)
            fill()

    def _log_nodes(self) -> None:
        if self.distributed and self.nodes:
            log.info(
                "%d parts ran on %d nodes",
                sum(self.nodes.values()),
                len(self.nodes),
                extra={"nodes": dict(self.nodes)},
            )


def open_engine(config: EngineConfig) -> Engine:
    """The engine ``config`` asks for; a Ray engine is connected to its cluster (close it)."""
    if config.kind == "ray":
        return RayEngine(config.ray_address)
    return LocalEngine()


class _Feed:
    """The tasks, numbered, taken only while there is room: fewer than ``limit`` parts in
    flight or finished and waiting for an earlier one."""

    def __init__(self, tasks: Iterator[Task], limit: int) -> None:
        self._tasks, self.limit = tasks, limit
        self.exhausted = False
        self._next = 0

    def take(self, busy: int) -> tuple[int, Task] | None:
        """The next task and its number; None when there is no room, no task ready yet, or no
        task left (``exhausted``)."""
        if self.exhausted or busy >= self.limit:
            return None
        task = next(self._tasks, _END)
        if task is _END:
            self.exhausted = True
            return None
        if task is NOT_YET:
            return None
        self._next += 1
        return self._next - 1, task


class _Results:
    """Finished parts, handed on as they come or, ``ordered``, in task order (the ones that
    arrive early wait here, and count as room taken)."""

    def __init__(self, ordered: bool) -> None:
        self.ordered = ordered
        self.waiting: dict[int, tuple[Task, Any]] = {}
        self._following = 0

    def add(self, index: int, task: Task, result: Any) -> list[tuple[Task, Any]]:
        if not self.ordered:
            return [(task, result)]
        self.waiting[index] = (task, result)
        ready = []
        while self._following in self.waiting:
            ready.append(self.waiting.pop(self._following))
            self._following += 1
        return ready


class _Tracker:
    """The driver's progress: each part counted at most its size, and exactly its size once
    done, whatever order (or how many times, for a retried part) reports come in."""

    def __init__(self, progress: Report | None) -> None:
        self.progress = progress
        self.sizes: dict[str, int] = {}
        self.reported: collections.Counter[str] = collections.Counter()

    def start(self, task: Task) -> None:
        self.sizes[task.key] = task.size

    def add(self, key: str, n: int) -> None:
        room = self.sizes.get(key, 0) - self.reported[key]
        n = min(n, room)
        if n > 0:
            self.reported[key] += n
            if self.progress is not None:
                self.progress(n)

    def done(self, key: str) -> None:
        self.add(key, self.sizes.get(key, 0))
        self.sizes.pop(key, None)
        self.reported.pop(key, None)


# --- this machine ------------------------------------------------------------------------------


class LocalEngine(Engine):
    """Parts in this process, or in a pool of spawned processes."""

    def _run(
        self,
        function: Function,
        tasks: Iterator[Task],
        shared: tuple[Any, ...],
        workers: int,
        tracker: _Tracker,
        results: _Results,
    ) -> Iterator[tuple[Task, Any]]:
        if workers > 1:
            # A pool, unless there is a single task (or none): its start-up would cost more.
            # The tasks are read as room frees up, never all at once: each may carry its input.
            first = _peek(tasks, 2)
            tasks = itertools.chain(first, tasks)
            if len(first) > 1 or NOT_YET in first:
                yield from self._pool(function, tasks, shared, workers, tracker, results)
                return
        feed = _Feed(tasks, limit=1)
        while not feed.exhausted:
            taken = feed.take(len(results.waiting))
            if taken is None:
                if not feed.exhausted:
                    time.sleep(_IDLE)
                continue
            index, task = taken
            tracker.start(task)
            result = function(*shared, *task.args, functools.partial(tracker.add, task.key))
            tracker.done(task.key)
            self.nodes["local"] += 1
            yield from results.add(index, task, result)

    def _pool(
        self,
        function: Function,
        tasks: Iterator[Task],
        shared: tuple[Any, ...],
        workers: int,
        tracker: _Tracker,
        results: _Results,
    ) -> Iterator[tuple[Task, Any]]:
        # spawn, not fork: the driver may hold threads (Arrow's pool, s3fs's event loop).
        context = multiprocessing.get_context("spawn")
        reports = context.Queue()
        feed = _Feed(tasks, limit=_IN_FLIGHT_PER_WORKER * workers)
        pending: dict[Future[Any], tuple[int, Task]] = {}
        # The function and the shared arguments go to each worker once, when it starts.
        pool = ProcessPoolExecutor(
            workers,
            mp_context=context,
            initializer=_init_worker,
            initargs=(reports, os.getpid(), function, shared),
        )

        def finished(futures: list[Future[Any]]) -> Iterable[Future[Any]]:
            done, _ = wait(futures, timeout=0.2, return_when=FIRST_COMPLETED)
            _drain(reports, tracker)
            return done

        try:
            yield from self._drive(
                feed,
                pending,
                tracker,
                results,
                submit=lambda task: pool.submit(_run_in_worker, task),
                finished=finished,
                collect=lambda future, task: (future.result(), "local"),
            )
        except BrokenProcessPool:
            pool.shutdown(wait=False, cancel_futures=True)
            raise EngineError(
                "a worker process died (out of memory? killed?); run the same command again to"
                " continue where it stopped"
            ) from None
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            pool.shutdown(wait=True)


def _peek(iterator: Iterator[Task], n: int) -> list[Task]:
    """Up to ``n`` items of ``iterator``: fewer when it ends, and none after a ``NOT_YET``
    (which is kept, as the sign that more tasks are to come)."""
    items: list[Task] = []
    while len(items) < n:
        item = next(iterator, _END)
        if item is _END:
            break
        items.append(item)
        if item is NOT_YET:
            break
    return items


_worker_reports: Any = None
_worker_function: Function | None = None
_worker_shared: tuple[Any, ...] = ()


def _init_worker(reports: Any, parent: int, function: Function, shared: tuple[Any, ...]) -> None:
    global _worker_reports, _worker_function, _worker_shared
    _worker_reports, _worker_function, _worker_shared = reports, function, shared
    # A worker left behind by a killed command leaves only temporary files, which the next
    # run removes; it must not wait for work for ever.
    exit_with_parent(parent)


class _QueueReport:
    """``report`` in a local worker process: sends to the driver's queue every few units."""

    def __init__(self, key: str, every: int = 16) -> None:
        self.key, self.every, self.pending = key, every, 0

    def __call__(self, n: int) -> None:
        self.pending += n
        if self.pending >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.pending and _worker_reports is not None:
            _worker_reports.put((self.key, self.pending))
        self.pending = 0


def _run_in_worker(task: Task) -> Any:
    assert _worker_function is not None
    report = _QueueReport(task.key)
    try:
        return _worker_function(*_worker_shared, *task.args, report)
    finally:
        report.flush()


def _drain(reports: Any, tracker: _Tracker) -> None:
    while True:
        try:
            key, n = reports.get_nowait()
        except queue.Empty:
            return
        tracker.add(key, n)


# --- a Ray cluster -----------------------------------------------------------------------------


class RayEngine(Engine):
    """Parts as Ray core tasks on the cluster at ``address`` (see the module doc)."""

    kind = "ray"
    distributed = True

    def __init__(self, address: str) -> None:
        super().__init__()
        self.ray = require("ray", 'the Ray engine (engine.kind = "ray")', RAY_INSTALL)
        self.address = address
        self._owns_connection = not self.ray.is_initialized()
        if self._owns_connection:
            _connect(self.ray, address)
        self._watch = _HeadWatch(self._errors(lambda: _head_address(self.ray, address)))
        # SPREAD: the parts go to every node, not first to fill the one nearest the driver.
        self._remote = self.ray.remote(
            num_cpus=1, max_retries=RETRIES, scheduling_strategy="SPREAD"
        )(_run_on_node)
        self._probe = self.ray.remote(num_cpus=0, max_retries=RETRIES)(_probe_paths)

    def close(self) -> None:
        self._watch.stop()
        if self._owns_connection and self.ray.is_initialized():
            self.ray.shutdown()

    def cpus(self) -> int:
        """CPUs of the cluster's live nodes: parts that run at once."""
        return max(1, int(self._errors(lambda: self.ray.cluster_resources().get("CPU", 1))))

    def _run(
        self,
        function: Function,
        tasks: Iterator[Task],
        shared: tuple[Any, ...],
        workers: int,
        tracker: _Tracker,
        results: _Results,
    ) -> Iterator[tuple[Task, Any]]:
        ray = self.ray
        reporter = self._errors(lambda: _progress_actor(ray).remote())
        shared_refs = tuple(self._errors(lambda: [ray.put(value) for value in shared]))
        feed = _Feed(tasks, limit=_IN_FLIGHT_PER_WORKER * self.cpus())
        pending: dict[Any, tuple[int, Task]] = {}
        taking = None

        def finished(refs: list[Any]) -> Iterable[Any]:
            nonlocal taking
            done, _ = self._errors(lambda: ray.wait(refs, num_returns=1, timeout=_REPORT_EVERY))
            if self._watch.lost is not None:
                raise _cluster_error(self.address, self._watch.lost)
            taking = self._take_reports(reporter, taking, tracker)
            return done

        try:
            yield from self._drive(
                feed,
                pending,
                tracker,
                results,
                submit=lambda task: self._remote.remote(function, shared_refs, task, reporter),
                finished=finished,
                collect=self._result,
            )
        except BaseException:
            for ref in pending:
                self._errors(lambda ref=ref: ray.cancel(ref, force=True))
            raise
        finally:
            self._errors(lambda: ray.kill(reporter))

    def _result(self, ref: Any, task: Task) -> tuple[Any, str]:
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, VsoError):
                raise cause from None
            detail = first_line(cause) if cause is not None else first_line(exc)
            raise EngineError(f"part {task.key} failed: {type(cause).__name__}: {detail}") from None
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as exc:
            raise EngineError(
                f"part {task.key}: its worker or node died {RETRIES + 1} time"
                f"{'s' if RETRIES else ''}"
                f" ({first_line(exc)}); run the same command again to continue"
            ) from None
        except ray.exceptions.RayError as exc:
            # Out of memory, unschedulable, cancelled...: the part failed, not the cluster.
            raise EngineError(
                f"part {task.key} failed: {type(exc).__name__}: {first_line(exc)}"
            ) from None

    def _take_reports(self, reporter: Any, taking: Any, tracker: _Tracker) -> Any:
        """Collect the progress the tasks sent; keeps one request to the actor outstanding."""
        ray = self.ray
        if taking is None:
            return reporter.take.remote()
        ready, _ = ray.wait([taking], timeout=0)
        if not ready:
            return taking
        try:
            reports = ray.get(taking)
        except ray.exceptions.RayError:
            return None  # progress is best effort; the parts' results count them anyway
        for key, n in reports.items():
            tracker.add(key, n)
        return reporter.take.remote()

    def check_visible(self, paths: Sequence[str]) -> None:
        seen_here = {path: _fingerprint(path) for path in paths}
        paths = [path for path, seen in seen_here.items() if seen.startswith(_READ)]
        if not paths:
            return
        expected = [seen_here[path] for path in paths]
        nodes = self._errors(lambda: [n for n in self.ray.nodes() if n.get("Alive")])
        strategy = require(
            "ray.util.scheduling_strategies", "the Ray engine", RAY_INSTALL
        ).NodeAffinitySchedulingStrategy
        refs = {
            self._probe.options(
                scheduling_strategy=strategy(node_id=node["NodeID"], soft=False)
            ).remote(list(paths)): node
            for node in nodes
        }
        gone = (
            self.ray.exceptions.TaskUnschedulableError,
            self.ray.exceptions.NodeDiedError,
            self.ray.exceptions.WorkerCrashedError,
        )
        for ref, node in refs.items():
            where = f"{node.get('NodeManagerAddress')} ({node['NodeID'][:8]})"
            try:
                seen = self._errors(lambda ref=ref: self._probe_result(ref, gone))
            except _NodeGone:
                # Listed as alive, yet gone (the head notices a lost node only after seconds):
                # it runs no part, so there is nothing of it to check.
                log.info("node %s left the cluster before its storage was checked", where)
                continue
            for path, want, got in zip(paths, expected, seen, strict=True):
                if got != want:
                    raise EngineError(
                        f"node {where} cannot see {path} as this machine does ({got}): every"
                        " node needs the same storage, a folder every node mounts or an"
                        " object store URL (docs/distributed.md)"
                    )

    def _probe_result(self, ref: Any, gone: tuple[type[BaseException], ...]) -> list[str]:
        try:
            return self.ray.get(ref)
        except gone:
            raise _NodeGone from None

    def _errors(self, call: Callable[[], Any]) -> Any:
        """``call()``, with a cluster that went away as one line."""
        try:
            return call()
        except self.ray.exceptions.RayError as exc:
            raise _cluster_error(self.address, exc) from None
        except ConnectionError as exc:
            raise _cluster_error(self.address, exc) from None


class _NodeGone(Exception):
    """A node's probe could not run: the node died after it was listed."""


def _connect(ray: Any, address: str) -> None:
    """``ray.init`` for ``address`` (or, when it is empty or ``auto``, the ``RAY_ADDRESS`` that
    Ray would follow, as ``ray job submit`` sets it); a bad address is an ``EngineError`` within
    seconds (Ray itself would wait minutes for a host that does not answer)."""
    target = _target(address)
    remote = target not in ("", "auto", "local")
    if remote:
        host, _, port = target.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise EngineError(
                f"cannot reach a Ray cluster at {target} ({reason}); start one with"
                " `ray start --head` or set engine.ray_address (--ray-address)"
            ) from None
    outcome: list[BaseException | None] = []

    def init() -> None:
        try:
            ray.init(
                address=address or None,
                logging_level=logging.WARNING,
                log_to_driver=False,
                configure_logging=False,
            )
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    if not remote:
        # Here ray.init may start a cluster on this machine, whose processes end with the thread
        # that started them: this one, not a helper thread. Ray answers fast for these.
        init()
    else:
        # A port that accepts connections but is no Ray head would hold ray.init for minutes.
        # In a helper thread Ray warns that it sets no SIGTERM handler: nothing for the user.
        worker_log = logging.getLogger("ray._private.worker")
        level = worker_log.level
        worker_log.setLevel(logging.ERROR)
        try:
            thread = threading.Thread(target=init, daemon=True)
            thread.start()
            thread.join(CONNECT_TIMEOUT)
        finally:
            worker_log.setLevel(level)
    if not outcome:
        raise EngineError(
            f"no Ray cluster answered at {target} within {CONNECT_TIMEOUT:.0f} s; is it the"
            " address of a Ray head node (ray start --head prints it), and does this machine"
            " hold the cluster's token (RAY_AUTH_MODE=token, ~/.ray/auth_token)?"
        )
    if outcome[0] is not None:
        raise EngineError(
            f"cannot connect to a Ray cluster at {target or 'the default address'}:"
            f" {first_line(outcome[0])}"
        ) from None


def _cluster_error(address: str, exc: BaseException) -> EngineError:
    return EngineError(
        f"lost the Ray cluster at {address or 'the default address'} ({type(exc).__name__}:"
        f" {first_line(exc)}); run the same command again once it is back to continue"
    )


def _target(address: str) -> str:
    """The address Ray connects to for ``address``: ``RAY_ADDRESS`` for an empty one or
    ``auto``, as Ray itself follows it."""
    if address in ("", "auto") and os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    return address


def _head_address(ray: Any, address: str) -> tuple[str, int] | None:
    """The host and port this driver talks to the cluster through: its head's GCS, or the Ray
    Client server of a ``ray://`` address (the GCS may be out of a client's reach); None when
    Ray does not say."""
    target = _target(address)
    try:
        if target.startswith("ray://"):
            host, _, port = target.removeprefix("ray://").rpartition(":")
        else:
            host, _, port = ray.get_runtime_context().gcs_address.rpartition(":")
        return host.strip("[]"), int(port)
    except (AttributeError, TypeError, ValueError):
        return None


class _HeadWatch:
    """Watches the head node in a helper thread: ``lost`` says why once it has not answered
    for half the time Ray waits before it ends this process with a line of its own
    (``GCS_RECONNECT_DEFAULT``). A head that comes back sooner (a GCS restarted by its
    supervisor) is not lost."""

    def __init__(self, head: tuple[str, int] | None, every: float = 1.0) -> None:
        # Ray spells its settings' variables this way: RAY_ and the setting's own name.
        waited = os.environ.get("RAY_gcs_rpc_server_reconnect_timeout_s", "")  # noqa: SIM112
        try:
            reconnect = float(waited) if waited.strip() else GCS_RECONNECT_DEFAULT
        except ValueError:
            reconnect = GCS_RECONNECT_DEFAULT
        # Half of Ray's wait: time for this process to let go of the cluster (ray.shutdown
        # waits seconds for a head that does not answer) before Ray ends it.
        self.patience = max(every, reconnect / 2)
        self.head, self.every = head, every
        self.lost: ConnectionError | None = None
        self._stopped = threading.Event()
        if head is not None:
            threading.Thread(target=self._watch, name="vsotools-ray-head", daemon=True).start()

    def _watch(self) -> None:
        assert self.head is not None
        silent_since: float | None = None
        while not self._stopped.wait(self.every):
            try:
                socket.create_connection(self.head, timeout=self.every).close()
                silent_since = None
            except OSError as exc:
                now = time.monotonic()
                silent_since = now if silent_since is None else silent_since
                if now - silent_since >= self.patience:
                    host, port = self.head
                    self.lost = ConnectionError(
                        f"its head {host}:{port} has not answered for {now - silent_since:.0f} s"
                        f" ({exc.strerror or exc})"
                    )
                    return

    def stop(self) -> None:
        self._stopped.set()


def _run_on_node(
    function: Function, shared: Sequence[Any], task: Task, reporter: Any
) -> tuple[Any, str]:
    """A part as a Ray task: its result, and the node it ran on."""
    import ray

    # Put in the object store once by the driver, not once per part; only a task's top-level
    # arguments are fetched by Ray itself.
    values = ray.get(list(shared))
    report = _ActorReport(reporter, task.key)
    try:
        result = function(*values, *task.args, report)
    finally:
        report.flush()
    return result, ray.get_runtime_context().get_node_id()


class _ActorReport:
    """``report`` in a Ray task: sends to the driver's progress actor every half second."""

    def __init__(self, reporter: Any, key: str) -> None:
        self.reporter, self.key, self.pending, self.sent = reporter, key, 0, time.monotonic()

    def __call__(self, n: int) -> None:
        self.pending += n
        if time.monotonic() - self.sent >= _REPORT_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.reporter.add.remote(self.key, self.pending)
        self.pending, self.sent = 0, time.monotonic()


@functools.cache
def _progress_actor(ray: Any) -> Any:
    """The actor class that gathers the tasks' progress for the driver."""

    @ray.remote(num_cpus=0)
    class Progress:
        def __init__(self) -> None:
            self.counts: collections.Counter[str] = collections.Counter()

        def add(self, key: str, n: int) -> None:
            self.counts[key] += n

        def take(self) -> dict[str, int]:
            counts, self.counts = dict(self.counts), collections.Counter()
            return counts

    return Progress


def _probe_paths(paths: Sequence[str]) -> list[str]:
    return [_fingerprint(path) for path in paths]


def _fingerprint(path: str) -> str:
    """What a node sees at ``path`` (a local file or an fsspec URL): the sha256 of its first
    mebibyte and its size, or why it cannot be read."""
    try:
        import fsspec

        with fsspec.open(path, "rb") as fh:
            head = fh.read(1 << 20)
            size = fh.seek(0, os.SEEK_END)
    except FileNotFoundError:
        return "no such file"
    except Exception as exc:  # no credentials, no network, a permission: what the node says
        return f"{type(exc).__name__}: {first_line(exc)}"
    return f"{_READ}{size} bytes, sha256 {hashlib.sha256(head).hexdigest()[:16]}"


_READ = "read: "
