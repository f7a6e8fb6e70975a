"""ROS 2 glue for the certified keypoint detector; the logic lives in usn_offline.runtime."""
