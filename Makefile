# The two commands a newcomer needs:
#   make run    install what is missing, bring the local stack up, run simulated sensors end to end
#   make test   install what is missing, then lint, type-check and run every test on real servers
VENV ?= .venv
CITYTEL = $(VENV)/bin/citytel

.PHONY: install run test lint unit integration down status cluster cluster-down

install:
	@bash deploy/local/install.sh

run: install
	@$(CITYTEL) run

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

unit: install
	$(VENV)/bin/pytest tests/unit

integration: install
	$(VENV)/bin/pytest tests/integration

test: lint
	$(VENV)/bin/pytest

down:
	@$(CITYTEL) stack down

# The compose deployment (deploy/compose/): builds the images, brings every server up in its
# own container, runs the simulated city through it and prints its progress until Ctrl-C.
cluster: install
	@$(CITYTEL) cluster up --watch

cluster-down:
	@$(CITYTEL) cluster down

status:
	@$(CITYTEL) stack status
