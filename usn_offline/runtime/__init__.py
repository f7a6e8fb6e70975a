"""Torch-free code shared by the offline tools and the robot-side node.

Nothing in this package may import torch at module level: the robot may not have it.
"""
