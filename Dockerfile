# Robot-side image: ROS 2 + the runtime of usn_offline + the keypoint node (+ torch for per-frame proofs).
#   docker build -t usn-keypoints .
#   docker run --rm --net=host -v /path/to/bundle:/bundle:ro usn-keypoints \
#       ros2 launch usn_keypoint_ros usn_keypoint_node.launch.py bundle_dir:=/bundle image_topic:=/camera/image_raw
# On a Jetson use a JetPack-matched ROS 2 base so that TensorRT comes from JetPack, e.g.
#   docker build --build-arg BASE_IMAGE=<L4T/JetPack ROS 2 image> --build-arg INSTALL_ROS_APT=0 .
# (INSTALL_ROS_APT=0: a source-built ROS image must not get ROS packages from apt.)
ARG BASE_IMAGE=ros:jazzy-ros-base
FROM ${BASE_IMAGE}

ARG INSTALL_ROS_APT=1
# Humble's Python 3.10 / NumPy 1.x: pick an onnxruntime release that supports them.
ARG ONNXRUNTIME_VERSION=1.32.0
ARG FRAME_PROOFS=1
ARG TORCH_VERSION=2.5.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The TensorRT runner's device buffers (no torch): match the CUDA of the base image (JetPack 6: 12.x).
ARG CUDA_PYTHON_VERSION=12.6.2

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-pip python3-opencv python3-yaml python3-cryptography \
    && if [ "${INSTALL_ROS_APT}" = "1" ]; then \
         apt-get install -y --no-install-recommends "ros-${ROS_DISTRO}-diagnostic-msgs" \
           "ros-${ROS_DISTRO}-launch-ros" "ros-${ROS_DISTRO}-ros2launch"; \
       fi \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/usn
COPY pyproject.toml README.md ./
COPY usn_offline ./usn_offline
COPY msg ./msg
COPY launch ./launch
COPY ros2_ws/src ./ros2_ws/src

# System ROS provides rclpy and the messages; install only our runtime (no ROS wheels).
RUN pip3 install --no-cache-dir --break-system-packages "onnxruntime==${ONNXRUNTIME_VERSION}" 2>/dev/null \
      || pip3 install --no-cache-dir "onnxruntime==${ONNXRUNTIME_VERSION}"; \
    pip3 install --no-cache-dir --no-deps --break-system-packages . 2>/dev/null \
      || pip3 install --no-cache-dir --no-deps .

# Where the base image has TensorRT (JetPack), the node runs the engine through cuda-python.
RUN if python3 -c "import tensorrt" 2>/dev/null; then \
      pip3 install --no-cache-dir --break-system-packages "cuda-python==${CUDA_PYTHON_VERSION}" 2>/dev/null \
        || pip3 install --no-cache-dir "cuda-python==${CUDA_PYTHON_VERSION}"; \
    fi

# Per-frame proofs (certified: true) need torch, onnx and tqdm; without them the node
# serves keypoints and reports every frame NOT_CHECKED. FRAME_PROOFS=0 builds that
# torch-free image. On a Jetson, a base image with NVIDIA's torch wheel keeps its torch.
RUN if [ "${FRAME_PROOFS}" = "1" ]; then \
      python3 -c "import torch" 2>/dev/null \
        || pip3 install --no-cache-dir --break-system-packages --index-url "${TORCH_INDEX_URL}" \
             "torch==${TORCH_VERSION}" 2>/dev/null \
        || pip3 install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"; \
      pip3 install --no-cache-dir --break-system-packages "onnx==1.17.0" "tqdm==4.67.1" 2>/dev/null \
        || pip3 install --no-cache-dir "onnx==1.17.0" "tqdm==4.67.1"; \
    fi

WORKDIR /opt/usn/ros2_ws
RUN source "/opt/ros/${ROS_DISTRO}/setup.bash" \
    && colcon build --cmake-args -DBUILD_TESTING=OFF \
    && rm -rf build log

RUN printf '#!/bin/bash\nset -e\nsource "/opt/ros/%s/setup.bash"\nsource /opt/usn/ros2_ws/install/setup.bash\nexec "$@"\n' \
      "${ROS_DISTRO}" > /opt/usn/entrypoint.sh \
    && chmod +x /opt/usn/entrypoint.sh

# Camera-size frames over SENSOR_DATA QoS need a larger Fast DDS shared-memory segment in the
# publishing process (the camera driver): give its container this file too (see README, ROS 2).
ENV FASTDDS_DEFAULT_PROFILES_FILE=/opt/usn/ros2_ws/install/usn_keypoint_ros/share/usn_keypoint_ros/launch/fastdds_large_frames.xml

ENTRYPOINT ["/opt/usn/entrypoint.sh"]
CMD ["ros2", "launch", "usn_keypoint_ros", "usn_keypoint_node.launch.py", "bundle_dir:=/bundle"]
