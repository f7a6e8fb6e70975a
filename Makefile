# One-command entry points. `make demo` and `make test` install everything first
# (scripts/setup.sh is idempotent and skips work already done).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
# QUICK=1: the same story on less data and shorter budgets (~2 min), in its own folder.
QUICK ?= 0
ifeq ($(QUICK),1)
DEMO_DIR ?= runs/quick
DATA_ARGS ?= --num-train 2000 --num-val 200 --num-test 200
EPOCHS ?= 6
BOUND_EPOCHS ?= 1
PRUNE_ARGS ?= --rounds 1 --finetune-epochs 1 --score-images 128
CERT_IMAGES ?= 5
BAG_FRAMES ?= 12
# the quick story certifies the small box: the goal box takes ~45 s per image
CERT_CONTRAST ?= 0.97 1.03
CERT_BRIGHTNESS ?= -0.03 0.03
CERT_EPS ?= 0.01 0.02
CERT_BAB_ARGS ?=
FRAME_FT_STAGES ?= 0.02:1 0.03:1
else
DEMO_DIR ?= runs/demo
DATA_ARGS ?=
EPOCHS ?= 20
BOUND_EPOCHS ?= 3
PRUNE_ARGS ?=
CERT_IMAGES ?= 20
BAG_FRAMES ?= 30
FRAME_FT_STAGES ?= 0.02:3 0.02:6 0.02:9 0.03:6 0.03:6 0.025:6 0.025:6
endif
# The goal box of the lighting a robot meets: contrast 0.75-1.33, brightness +-0.15,
# proved for at least CERT_COVERAGE of the test images (else the largest CERT_EPS box that is).
CERT_CONTRAST ?= 0.75 1.33
CERT_BRIGHTNESS ?= -0.15 0.15
CERT_EPS ?= 0.03 0.1
CERT_COVERAGE ?= 0.9
# Branch-and-bound budget per image (work, not seconds). The goal box needs splits 14
# deep on some images (measured: one test image, 0.5 px from δ by sampling, stays open at
# the default depth 10 and is proved at depth 14 with 645 boxes).
CERT_BAB_ARGS ?= --bab-budget 1024 --bab-depth 14
# The best configuration (docs/METHOD.md, "Input standardisation" and "What keeps the last 59
# frames open"): a network that standardises its input, fine-tuned with the bound loss over
# tiles of the goal box (half its images on the sets a frame's proof covers), USN-WD pruning
# that keeps that loss in its fine-tuning rounds, then short fine-tunes with every bound-loss
# image on a frame set (the levers combined). FRAME_FT_STAGES: weight:epochs per fine-tune,
# each continuing from the one before with its own learning-rate cycle; the last one's
# network (FINAL) is evaluated, certified and exported.
TRAIN_ARGS ?= --input-norm standardise
BOUND_LOSS ?= --bound-weight 0.03 --bound-box $(CERT_CONTRAST) $(CERT_BRIGHTNESS) --bound-tiles 16 \
	--bound-frame-sets 0.5
BOUND_ARGS ?= --lr 3e-4 $(BOUND_LOSS) --bound-ramp-epochs 1
PRUNE_METHOD ?= usn-wd
PRUNE_RATIO ?= 0.3
FRAME_FT_ARGS ?= --lr 2e-4 --bound-box $(CERT_CONTRAST) $(CERT_BRIGHTNESS) --bound-tiles 16 \
	--bound-frame-sets 1.0 --bound-ramp-epochs 0
FINAL := $(DEMO_DIR)/final.pt
# Every process that may start rclpy keeps DDS on loopback, on its own domain, with the
# shipped Fast DDS profile under which camera-size frames arrive over SENSOR_DATA QoS.
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST
export ROS_DOMAIN_ID ?= 57
export FASTDDS_DEFAULT_PROFILES_FILE ?= $(CURDIR)/launch/fastdds_large_frames.xml
ENV := source scripts/env.sh &&

.PHONY: setup demo test lint clean node

setup:
	@bash scripts/setup.sh

demo: setup
	$(ENV) usn-offline data --out $(DEMO_DIR)/data $(DATA_ARGS)
	$(ENV) usn-offline train --data $(DEMO_DIR)/data --out $(DEMO_DIR)/model.pt --epochs $(EPOCHS) \
		$(TRAIN_ARGS) --resume
	$(ENV) usn-offline train --data $(DEMO_DIR)/data --init $(DEMO_DIR)/model.pt --out $(DEMO_DIR)/model_bound.pt \
		--epochs $(BOUND_EPOCHS) $(BOUND_ARGS) --resume
	$(ENV) usn-offline prune --checkpoint $(DEMO_DIR)/model_bound.pt --data $(DEMO_DIR)/data \
		--method $(PRUNE_METHOD) --ratio $(PRUNE_RATIO) $(PRUNE_ARGS) $(BOUND_LOSS) --out $(DEMO_DIR)/pruned.pt --resume
	$(ENV) init=$(DEMO_DIR)/pruned.pt; stage=0; stages=($(FRAME_FT_STAGES)); \
	for spec in "$${stages[@]}"; do \
		stage=$$((stage + 1)); out=$(DEMO_DIR)/frame_ft/stage$$stage.pt; \
		if [ $$stage -eq $${#stages[@]} ]; then out=$(FINAL); fi; \
		usn-offline train --data $(DEMO_DIR)/data --init $$init --out $$out --epochs $${spec#*:} \
			--bound-weight $${spec%%:*} $(FRAME_FT_ARGS) --resume; \
		init=$$out; \
	done; \
	if [ $$stage -eq 0 ]; then cp $(DEMO_DIR)/pruned.pt $(FINAL); cp $(DEMO_DIR)/pruned.json $(DEMO_DIR)/final.json; fi
	$(ENV) usn-offline evaluate --checkpoint $(FINAL) --data $(DEMO_DIR)/data --split test \
		--out $(DEMO_DIR)/eval.json
	$(ENV) usn-offline certify --checkpoint $(FINAL) --data $(DEMO_DIR)/data --split test \
		--num-images $(CERT_IMAGES) --delta 2 --contrast $(CERT_CONTRAST) --brightness $(CERT_BRIGHTNESS) \
		--eps $(CERT_EPS) --coverage $(CERT_COVERAGE) $(CERT_BAB_ARGS) --out $(DEMO_DIR)/certificate.json
	$(ENV) usn-offline export --checkpoint $(FINAL) --certificate $(DEMO_DIR)/certificate.json \
		--out $(DEMO_DIR)/bundle
	rm -rf $(DEMO_DIR)/scenario_bag
	$(ENV) usn-offline make-bag --data $(DEMO_DIR)/data --out $(DEMO_DIR)/scenario_bag --frames $(BAG_FRAMES)
	$(ENV) usn-offline replay --bag $(DEMO_DIR)/scenario_bag --bundle $(DEMO_DIR)/bundle --live \
		--out $(DEMO_DIR)/replay
	@echo "demo outputs: $(DEMO_DIR)/ (data/, model.pt, model_bound.pt, pruned.pt, frame_ft/, final.pt, eval.json, certificate.json, bundle/," \
		"scenario_bag/, replay/: report.json, summary.md, plots)"

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
