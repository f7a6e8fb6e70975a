# Robot-side image: ROS 2 + the torch-free runtime of usn_offline (the node arrives with a
# later milestone). On a Jetson, build with a JetPack-matched ROS base, e.g.
#   docker build --build-arg BASE_IMAGE=<L4T/JetPack-matched ROS 2 image> -t usn-keypoints .
# so that TensorRT comes from JetPack; do not add apt ROS packages on top of a
# source-built ROS image.
ARG BASE_IMAGE=ros:jazzy-ros-base
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# cv_bridge and OpenCV from the ROS distribution (matched to its NumPy).
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3-pip python3-opencv python3-skimage python3-tqdm \
        "ros-${ROS_DISTRO}-cv-bridge" "ros-${ROS_DISTRO}-diagnostic-msgs" \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/usn
COPY pyproject.toml README.md ./
COPY usn_offline ./usn_offline
# System ROS provides rclpy/messages; install only our package (no wheels of ROS, no torch).
RUN pip3 install --no-cache-dir --no-deps --break-system-packages . 2>/dev/null \
    || pip3 install --no-cache-dir --no-deps .

ENV ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
CMD ["bash", "-c", "source /opt/ros/${ROS_DISTRO}/setup.bash && python3 -c 'import usn_offline.runtime.preprocess; print(\"usn runtime ok\")'"]
