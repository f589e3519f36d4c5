"""Tip-degradation monitoring: physical line features, a learned window classifier, alerts."""
