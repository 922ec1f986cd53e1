import pytest
import torch


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
def lesson_run():
    """``lesson_run(path)``: the lesson executed once per session, with each Predict's first
    typical wrong answer typed (tests/lesson_runs.py), shared by every test that reads a lesson's
    outputs. A run that failed fails each test that asks for it, without running again."""
    from lesson_runs import run_with_first_guesses

    runs: dict = {}

    def run(path):
        if path not in runs:
            try:
                runs[path] = run_with_first_guesses(path)
            except Exception as error:  # noqa: BLE001 -- kept, and raised for each asker
                runs[path] = error
        if isinstance(runs[path], Exception):
            raise runs[path]
        return runs[path]

    return run


@pytest.fixture(scope="session")
def course_class(tmp_path_factory):
    """The course's own exercises graded once per session, in one class run shared by the tests
    that read it (tests/grading_kit.py: ``course_class``)."""
    from grading_kit import course_class as graded

    return graded(tmp_path_factory.mktemp("course-class"))
