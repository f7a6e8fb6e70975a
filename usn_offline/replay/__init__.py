"""Rosbag replay evaluation (torch-free): scenario bags, offline and live replay, reports.

Nothing here imports torch or the offline stages that do (train, certify, prune, export):
replay runs the node's own runtime code (:mod:`usn_offline.runtime.stream`) and is meant
to run wherever the node runs. Sub-modules are imported where they are used, so that
reading a bag needs neither rclpy nor matplotlib.
"""
