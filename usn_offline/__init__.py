"""usn_offline: certified keypoint perception under brightness/contrast changes.

Offline stages (dataset -> model -> pruned model -> certificate -> bundle), each a
sub-package; ``runtime`` holds the torch-free code the robot-side node imports.
"""

__version__ = "0.1.0"
