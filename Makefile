# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv when needed and install torch (local CPU wheel) plus the pinned
# dependencies; the stamp file makes a second run skip the install.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cirlab-installed
DEMO_DIR ?= runs/demo

.PHONY: demo test install browser clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cirlab demo --out $(DEMO_DIR)

# chromium for tests/test_browser.py (Debian's package; sudo only when not root)
browser:
	@command -v chromium >/dev/null || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

test: $(STAMP) browser
	CIRLAB_REQUIRE_BROWSER=1 $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
