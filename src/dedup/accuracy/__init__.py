"""Accuracy of the face model and thresholds: 1:N error rates, evaluation on labelled sets,
the packaged real photos."""
