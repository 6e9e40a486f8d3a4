# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv when needed and install torch (local CPU wheel) plus the pinned
# dependencies; the stamp file makes a second run skip the install.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cirlab-installed
DEMO_DIR ?= runs/demo

DOCS_STAMP := $(VENV)/.cirlab-docs-installed

.PHONY: demo test install browser clean docs docs-build

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

# the docs site (mkdocs.yml): `make docs` serves it at http://127.0.0.1:8000 and rebuilds on edits,
# `make docs-build` builds site/ as CI does; both --strict (a broken link, anchor or missing docstring fails)
$(DOCS_STAMP): $(STAMP) docs/requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check -r docs/requirements.txt -c requirements.lock
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --strict

docs-build: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) site
