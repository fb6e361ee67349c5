"""Experiment drivers, kept out of the convert pipeline (quantkit.passes):

    experiments.search  replicate-search: greedy search over repeated block ranges,
                        each configuration really converted and measured
    experiments.chart   a small PNG scatter chart (numpy + zlib), size against KLD
"""
