from pathlib import Path

import pytest
import torch


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """`make test` runs on two workers (pytest-xdist, ``-n 2 --dist loadgroup``), each taking
    whole groups: a test that names no group (``xdist_group``) gets its file's, so a file's
    module-scoped set-ups (a class graded, a JupyterLab started) run once and a notebook's cells
    under nbval stay in order on one kernel. Tests that share a session's run across files name
    its group (``lesson_runs.on(path)``, ``grading_kit.reads_course_class``). Under xdist the
    groups that hold a notebook or a subprocess (``slow``, nbval) are dealt first and the quick
    ones fill in at the end, so neither worker is left with a long group while the other waits."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
    if getattr(config.option, "loadgroup", False):  # xdist sets it on its workers
        slow = {_group(i) for i in items if i.get_closest_marker("slow") or _is_notebook(i)}
        items.sort(key=lambda item: _group(item) not in slow)  # stable: else as collected
        for item in items:
            _name_group_in_nodeid(item)


def _name_group_in_nodeid(item) -> None:
    """xdist's scheduler reads a test's group from its nodeid ("...@group"). xdist 3.8 appends
    it by setting ``item._nodeid``, which pytest 9.2 no longer reads (it keeps ``item._id``): the
    groups were lost and a notebook's cells went to both workers (a fresh kernel midway: a
    NameError). So the suffix is written here, where pytest 9.2 keeps the nodeid."""
    from _pytest.nodeid import NodeId

    if "@" not in item.nodeid.rsplit("]", 1)[-1]:  # a fixed xdist has not done it already
        item._id = NodeId.parse(f"{item.nodeid}@{_group(item)}")


def _group(item) -> str:
    return item.get_closest_marker("xdist_group").args[0]


def _is_notebook(item) -> bool:
    return Path(str(item.path)).suffix == ".ipynb"


def _require_group(request, group: str, fix: str) -> None:
    """A test that reads a session's shared run must be in that run's group: under xdist a test
    of another group may run on the other worker, which would make the run a second time."""
    mine = {m.args[0] for m in request.node.iter_markers("xdist_group")}
    if group not in mine:
        pytest.fail(f"{request.node.nodeid} reads a shared run: mark it {fix} (xdist group "
                    f"{group!r}) so that the run is made once", pytrace=False)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Byte counts do not depend on threads; tiny ops on 2 threads of a busy 2-core machine can
    be 100x slower (the threads wait for each other), so every test uses one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same seeds: torch's, and the checks' (the grader, run in this
    process by the grading tests, sets a secret one)."""
    from ckpt_course import checks

    torch.manual_seed(0)
    checks.set_seed(0)
    yield


@pytest.fixture(scope="session")
def _lesson_runs():
    """The lessons run so far this session: path -> its LessonRun, or the error it raised."""
    return {}


@pytest.fixture
def lesson_run(request, _lesson_runs):
    """``lesson_run(path)``: the lesson executed once per session, with each Predict's first
    typical wrong answer typed (tests/lesson_runs.py), shared by every test that reads a lesson's
    outputs (each marked ``lesson_runs.on(path)``). A run that failed fails each test that asks
    for it, without running again."""
    from lesson_runs import group_of, run_with_first_guesses

    def run(path):
        _require_group(request, group_of(path), f"@lesson_runs.on({Path(path).name!r})")
        if path not in _lesson_runs:
            try:
                _lesson_runs[path] = run_with_first_guesses(path)
            except Exception as error:  # noqa: BLE001 -- kept, and raised for each asker
                _lesson_runs[path] = error
        if isinstance(_lesson_runs[path], Exception):
            raise _lesson_runs[path]
        return _lesson_runs[path]

    return run


@pytest.fixture(scope="session")
def _course_class_run(tmp_path_factory):
    from grading_kit import course_class

    return course_class(tmp_path_factory.mktemp("course-class"))


@pytest.fixture
def course_class(request):
    """The course's own exercises graded once per session, in one class run shared by the tests
    that read it (tests/grading_kit.py: ``course_class``), each marked ``@reads_course_class``."""
    from grading_kit import COURSE_CLASS

    _require_group(request, COURSE_CLASS, "@grading_kit.reads_course_class")  # before the run
    return request.getfixturevalue("_course_class_run")
