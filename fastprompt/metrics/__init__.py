"""Metrics: accuracy on test images (with the test-feature cache) and the summaries papers report."""
from .accuracy import Evaluator, features_accuracy
from .feature_cache import EvalFeatureCache, backbone_fingerprint, encode_samples
from .summary import harmonic_mean, mean, std

__all__ = ["Evaluator", "features_accuracy", "EvalFeatureCache", "backbone_fingerprint", "encode_samples",
           "harmonic_mean", "mean", "std"]
