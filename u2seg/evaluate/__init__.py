"""Evaluation against labeled benchmarks: pseudo->gt category matching, PQ, AP/AR, mIoU, HTML report.

Pure functions over numpy / COCO files (no Ray): matching, pq, instance, semantic, report.
"""
