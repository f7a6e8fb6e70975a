"""Certification of keypoint networks against brightness/contrast changes.

Bound propagation (IBP, forward linear, CROWN, alpha-CROWN) over a lowered graph of the
network preceded by the perturbation layer, input-space branch and bound over (a, b)
boxes, radius search, region maps and the certification report.
"""

from usn_offline.certify.bab import BabConfig, BoxOutcome, Status, certify_boxes
from usn_offline.certify.bounds import Method, PixelMap, output_bounds
from usn_offline.certify.boxes import Boxes
from usn_offline.certify.engine import CertificationReport, CertifyConfig, ParallelConfig, certify_dataset
from usn_offline.certify.errors import CertificationError
from usn_offline.certify.graph import Graph, lower
from usn_offline.certify.search import RadiusConfig, largest_certified_radius, region_map
from usn_offline.certify.spec import KeypointProperty, Norm, Reference

__all__ = ["BabConfig", "BoxOutcome", "Boxes", "CertificationError", "CertificationReport", "CertifyConfig",
           "Graph", "KeypointProperty", "Method", "Norm", "ParallelConfig", "PixelMap", "RadiusConfig", "Reference",
           "Status",
           "certify_boxes", "certify_dataset", "largest_certified_radius", "lower", "output_bounds",
           "region_map"]
