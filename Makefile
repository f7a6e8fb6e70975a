# One-command entry points. `make demo` and `make test` install everything first
# (scripts/setup.sh is idempotent and skips work already done).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
DEMO_DIR ?= runs/demo
EPOCHS ?= 20
CERT_IMAGES ?= 20
CERT_CONTRAST ?= 0.97 1.03
CERT_BRIGHTNESS ?= -0.03 0.03
CERT_EPS ?= 0.01 0.02
PRUNE_METHOD ?= usn-wd
PRUNE_RATIO ?= 0.3
# Every process that may start rclpy keeps DDS on loopback, on its own domain.
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST
export ROS_DOMAIN_ID ?= 57
ENV := source scripts/env.sh &&

.PHONY: setup demo test lint clean node

setup:
	@bash scripts/setup.sh

demo: setup
	$(ENV) usn-offline data --out $(DEMO_DIR)/data
	$(ENV) usn-offline train --data $(DEMO_DIR)/data --out $(DEMO_DIR)/model.pt --epochs $(EPOCHS) --resume
	$(ENV) usn-offline prune --checkpoint $(DEMO_DIR)/model.pt --data $(DEMO_DIR)/data \
		--method $(PRUNE_METHOD) --ratio $(PRUNE_RATIO) --out $(DEMO_DIR)/pruned.pt --resume
	$(ENV) usn-offline evaluate --checkpoint $(DEMO_DIR)/pruned.pt --data $(DEMO_DIR)/data --split test \
		--out $(DEMO_DIR)/eval.json
	$(ENV) usn-offline certify --checkpoint $(DEMO_DIR)/pruned.pt --data $(DEMO_DIR)/data --split test \
		--num-images $(CERT_IMAGES) --delta 2 --contrast $(CERT_CONTRAST) --brightness $(CERT_BRIGHTNESS) \
		--eps $(CERT_EPS) \
		--out $(DEMO_DIR)/certificate.json
	$(ENV) usn-offline export --checkpoint $(DEMO_DIR)/pruned.pt --certificate $(DEMO_DIR)/certificate.json \
		--out $(DEMO_DIR)/bundle
	@echo "demo outputs: $(DEMO_DIR)/ (data/, model.pt, pruned.pt, eval.json, certificate.json, bundle/)"

test: setup
	$(ENV) ruff check usn_offline tests bench scripts ros2_ws/src
	$(ENV) hadolint Dockerfile
	$(ENV) python -m pytest -q

lint: setup
	$(ENV) ruff check usn_offline tests bench scripts ros2_ws/src
	$(ENV) hadolint Dockerfile

# Run the node here on the demo bundle (ROS 2 from the wheels; `ros2 launch` needs a ROS install).
node: setup
	$(ENV) python -m usn_keypoint_ros.node --ros-args --params-file launch/usn_keypoint_node.params.yaml \
		-p bundle_dir:=$(DEMO_DIR)/bundle

clean:
	rm -rf runs .pytest_cache .ruff_cache
