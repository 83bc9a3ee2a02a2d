"""The face pipeline: photo bytes to a checked capture and a 512-d ArcFace embedding."""
