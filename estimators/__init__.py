"""The energy side of wattproxy: meters, attribution, estimates and carbon intensity.

Everything here that computes (attribution, priors, carbon math) is pure and does no I/O; the
meters and the sampler are the thin shells that read hardware.
"""
