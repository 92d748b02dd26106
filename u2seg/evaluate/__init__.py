"""Evaluation against labeled benchmarks: pseudo->gt category matching, PQ, AP/AR, mIoU, HTML report.

Pure functions over numpy / COCO files (no Ray): matching (strict one-to-one protocol), u2seg_protocol
(U2Seg's own many-to-one vote mapping), supercategory (U2Seg's stuff-supercategory ground truth), pq,
instance, semantic, report.
"""
