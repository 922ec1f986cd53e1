# The course's two commands: `make lab` opens it, `make test` passes every test.
# Both install into a project-local virtual environment (.venv) from requirements.txt first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PORT   ?= 8888
# Jupyter refuses to run as root unless told; learners on laptops are not root.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)
# nbval compares text; tracebacks without ANSI colour codes read better in its reports.
export IPYTHONDIR := $(CURDIR)/.venv/ipython

.PHONY: lab test check-fast lint bench gpu-check install clean-venv

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt -e .
	mkdir -p $(IPYTHONDIR)/profile_default
	echo "c.InteractiveShell.colors = 'nocolor'" > $(IPYTHONDIR)/profile_default/ipython_config.py
	touch $(STAMP)

# JupyterLab on localhost only, behind its token (printed in the URL it shows), in the learner's
# own copy of the lessons and exercises (ignored by git, made on the first run, updated by later
# runs without touching the learner's edits): running the course never modifies a tracked file.
COPY ?= my-course
lab: $(STAMP)
	$(BIN)/ckpt-course sync-course --into $(COPY)
	$(BIN)/jupyter lab --ServerApp.ip=127.0.0.1 --ServerApp.port=$(PORT) \
		--ServerApp.root_dir=$(CURDIR)/$(COPY) --LabApp.default_url=/lab/tree/notebooks $(ROOT_FLAG)

# Everything: unit tests, lessons (each run once, with wrong answers typed: tests/lesson_runs.py),
# solutions through nbval, grading, CLI. Two workers (pytest-xdist), each taking whole groups of
# tests that share a set-up, so every shared run is still made once (tests/conftest.py).
test: $(STAMP)
# CKPT_COURSE_STRICT_TABLES: every lesson run also checks its Predict tables against its derivations.
	CKPT_COURSE_STRICT_TABLES=1 $(BIN)/python -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder \
		tests solutions --nbval-lax --nbval-current-env

# Lint plus the tests not marked slow, on both cores (about 2 minutes on 2 cores; 3 on one).
check-fast: $(STAMP)
	$(BIN)/ruff check ckpt_course tests bench
	$(BIN)/python -m pytest -q -x -n 2 -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check ckpt_course tests bench

bench: $(STAMP)
	for f in bench/*.py; do $(BIN)/python $$f || exit 1; done

# Every CUDA path of the course on this machine's GPU, in one table (without CUDA: says so, exits 0).
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu_check.py

clean-venv:
	rm -rf $(VENV)
