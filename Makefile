# One-command entry points. `make demo` and `make test` install everything first
# (scripts/setup.sh is idempotent and skips work already done).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
DEMO_DIR ?= runs/demo
EPOCHS ?= 20
# Every process that may start rclpy keeps DDS on loopback, on its own domain.
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST
export ROS_DOMAIN_ID ?= 57
ENV := source scripts/env.sh &&

.PHONY: setup demo test lint clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(ENV) usn-offline data --out $(DEMO_DIR)/data
	$(ENV) usn-offline train --data $(DEMO_DIR)/data --out $(DEMO_DIR)/model.pt --epochs $(EPOCHS) --resume
	$(ENV) usn-offline evaluate --checkpoint $(DEMO_DIR)/model.pt --data $(DEMO_DIR)/data --split test \
		--out $(DEMO_DIR)/eval.json
	@echo "demo outputs: $(DEMO_DIR)/ (data/, model.pt, model.json, eval.json)"

test: setup
	$(ENV) ruff check usn_offline tests bench
	$(ENV) python -m pytest -q

lint: setup
	$(ENV) ruff check usn_offline tests bench

clean:
	rm -rf runs .pytest_cache .ruff_cache
